"""PyTorch side of the device check: the measured ceilings, random-weight Mistral checkpoints,
the greedy reference and the transformers baselines. Used by check.py; no tessera here."""
import json
import math
import os
import shutil
import time

from check_report import fmt

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=32768, max_position_embeddings=4096),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=32768, max_position_embeddings=32768),
    # --dry-run stand-ins for both roles
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=2048),
}


def measure_ceilings(torch, dev, copy_bytes, gemm_n):
    """Copy bandwidth (bytes read + written per second, best of 10) and bf16 GEMM FLOP/s (mean of 10)."""
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    out = {}
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=dev)
    src.fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync()
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t)
    out["copy_bytes"] = copy_bytes
    out["copy_bandwidth_bytes_per_s"] = 2 * copy_bytes / best
    del src, dst
    a = torch.randn(gemm_n, gemm_n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(gemm_n, gemm_n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        torch.matmul(a, b)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        torch.matmul(a, b)
    sync()
    mean = (time.perf_counter() - t) / 10
    out["gemm_n"] = gemm_n
    out["gemm_bf16_flops_per_s"] = 2 * gemm_n ** 3 / mean
    del a, b
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


INITS = ("stable", "hf")


def build_model(torch, shape, seed, dev, init="stable"):
    """A random-weight bf16 MistralForCausalLM (SDPA attention), created directly on `dev`.

    Every matrix ~ normal(0, 0.02), every norm weight 1 + normal(0, 0.05), seeded. With
    init="hf" that is all (Hugging Face's initializer_range). With init="stable" (default):
    - the embeddings get std 1 and the residual-branch outputs (o_proj, down_proj) std 0.002, so
      the residual stream is not dominated by freshly rounded branch outputs. Measured on the 1b
      shape (CPU): PyTorch's own bf16 logits are ~2.2% (relative) from an f32 run of the same
      weights with "hf", ~1.0% with "stable"; with "hf" a 2e-2 bound against PyTorch bf16 would
      measure PyTorch's rounding more than tessera's;
    - lm_head gets std 0.3 / sqrt(hidden), so logits have std ~0.3. Two correct bf16
      implementations differ by ~1% of that (~0.004), well under the 1e-2 near-tie threshold,
      so greedy tokens can only part at steps the criterion exempts; with std ~0.9 they part at
      one-ulp gaps (0.0156) about every other run. The price: near-ties come every ~7 steps, so
      fewer steps are checked per prompt."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(**SHAPES[shape], rope_theta=1e6, tie_word_embeddings=False, sliding_window=None,
                        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            model = MistralForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model = model.to(device=dev, dtype=torch.bfloat16).eval()
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # RMSNorm weights
                p.copy_(1.0 + 0.05 * torch.randn(p.shape, generator=g, device=dev, dtype=torch.float32))
            else:
                std = 0.02
                if init == "stable" and name.endswith("embed_tokens.weight"):
                    std = 1.0
                elif init == "stable" and name.endswith(("o_proj.weight", "down_proj.weight")):
                    std = 0.002
                elif init == "stable" and name.endswith("lm_head.weight"):
                    std = 0.3 / math.sqrt(model.config.hidden_size)
                p.copy_(torch.randn(p.shape, generator=g, device=dev, dtype=torch.float32).mul_(std))
    model.generation_config.eos_token_id = None  # never stop early
    model.generation_config.pad_token_id = 0
    return model


def byte_tokenizer_json(vocab_size):
    """The same byte-fallback BPE tokenizer tessera builds for dummy models (text_assets.rs)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = 3 + b
    for i in range(259, vocab_size):
        vocab[f"<extra_{i}>"] = i

    def special(i, content):
        return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True}

    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }


def save_checkpoint(model, path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    model.save_pretrained(path)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump(byte_tokenizer_json(model.config.vocab_size), f)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def matmul_params(model):
    """Parameters of the decoder layers' matrices: the per-token matmul work is 2 FLOPs each
    (embeddings, lm_head (applied once per sequence in a prefill) and norms excluded)."""
    return sum(p.numel() for n, p in model.model.layers.named_parameters() if p.ndim == 2)


def reference_greedy(torch, model, prompts, steps):
    """Per prompt: first-step logits (f32, CPU), greedy tokens and each step's top-2 logit gap."""
    dev = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=dev)
            res = model(input_ids=ids, use_cache=True)
            logits = res.logits[0, -1].float()
            first = logits.cpu()
            past = res.past_key_values
            tokens, gaps = [], []
            for step in range(steps):
                top = torch.topk(logits, 2)
                gaps.append(float(top.values[0] - top.values[1]))
                tok = int(torch.argmax(logits))  # first maximum, like tessera's argmax
                tokens.append(tok)
                if step + 1 == steps:
                    break
                res = model(input_ids=torch.tensor([[tok]], device=dev), past_key_values=past, use_cache=True)
                past = res.past_key_values
                logits = res.logits[0, -1].float()
            out.append({"first_logits": first, "tokens": tokens, "gaps": gaps})
    return out


def pytorch_baselines(torch, model, batches, prompt_len, gen_len, prefill_len, seed, budget, reserve_s, log_fn, res):
    """transformers generate throughput per batch size, and a prefill forward; results go into
    `res` ({"generate": [], "prefill": None, "skipped": []}) as they come."""
    dev = next(model.parameters()).device
    vocab = model.config.vocab_size
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(seed)

    def gen(ids, n):
        sync()
        t = time.perf_counter()
        o = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                           use_cache=True, eos_token_id=None, pad_token_id=0)
        sync()
        return time.perf_counter() - t, o.shape[1] - ids.shape[1]

    with torch.no_grad():
        # prefill first: it is cheap and is the figure for the prefill ratio
        if budget.left() > reserve_s + 20:
            ids = torch.randint(3, vocab, (1, prefill_len), generator=g).to(dev)
            times = []
            for _ in range(3):
                sync()
                t = time.perf_counter()
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
                sync()
                times.append(time.perf_counter() - t)
            best = min(times[1:])
            res["prefill"] = {"prompt_len": prefill_len, "seconds": best, "tok_s": prefill_len / best}
            log_fn(f"pytorch prefill {prefill_len}: {prefill_len / best:.0f} tok/s")
        else:
            res["skipped"].append("prefill: time budget")
        # Largest batch first: acceptance compares against it; the smaller ones are context and
        # are the ones a short budget drops.
        for b in sorted(batches, reverse=True):
            # rough cost: a warm-up, then 1 and gen_len new tokens; skip when it may not fit
            if budget.left() < reserve_s + 25 + 0.2 * b:
                res["skipped"].append(f"generate batch {b}: time budget")
                log_fn(f"pytorch generate batch {b}: skipped (time budget, {budget.left():.0f} s left)")
                continue
            ids = torch.randint(3, vocab, (b, prompt_len), generator=g).to(dev)
            gen(ids, 2)  # warm-up
            t1, _ = gen(ids, 1)
            tn, n_new = gen(ids, gen_len)
            row = {"batch": b, "prompt_len": prompt_len, "gen_len": n_new, "seconds": tn,
                   "seconds_1_token": t1,
                   "e2e_tok_s": b * n_new / tn,
                   "decode_tok_s": b * (n_new - 1) / (tn - t1) if tn > t1 and n_new > 1 else None}
            res["generate"].append(row)
            log_fn(f"pytorch generate batch {b}: {row['e2e_tok_s']:.0f} tok/s end to end, "
                   f"{fmt(row['decode_tok_s'], '.0f')} tok/s decode")
            del ids
            if dev.type == "cuda":
                torch.cuda.empty_cache()
