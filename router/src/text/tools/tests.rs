//! Tests of tool-call parsing: each style's forms and failure modes, and that streaming in any
//! chunks gives what parsing the whole text gives.

use proptest::prelude::*;
use serde_json::json;

use super::*;

fn tools() -> Vec<ToolSpec> {
    ["get_weather", "get_time", "search"]
        .into_iter()
        .map(|name| ToolSpec { name: name.into(), description: String::new(), parameters: json!({"type": "object"}) })
        .collect()
}

fn parse(style: ToolCallStyle, text: &str) -> ToolCallParse {
    parse_tool_calls(style, text, &tools())
}

/// `text` fed in pieces of the given sizes (in characters, cycled), with ids from `seed`.
fn streamed(style: ToolCallStyle, text: &str, sizes: &[usize], seed: u64) -> ToolCallParse {
    let mut streamer = ToolCallStreamer::with_seed(style, &tools(), seed);
    let mut out = ToolCallParse::default();
    let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).chain([text.len()]).collect();
    let (mut at, mut k) = (0, 0);
    while at < bounds.len() - 1 {
        let next = (at + sizes[k % sizes.len()].max(1)).min(bounds.len() - 1);
        out.append(streamer.push(&text[bounds[at]..bounds[next]]));
        at = next;
        k += 1;
    }
    out.append(streamer.finish());
    out
}

fn whole(style: ToolCallStyle, text: &str, seed: u64) -> ToolCallParse {
    let mut streamer = ToolCallStreamer::with_seed(style, &tools(), seed);
    let mut out = streamer.push(text);
    out.append(streamer.finish());
    out
}

fn names(parse: &ToolCallParse) -> Vec<&str> {
    parse.calls.iter().map(|c| c.name.as_str()).collect()
}

fn assert_call(call: &ParsedToolCall, name: &str, arguments: Value) {
    assert_eq!((call.name.as_str(), &call.arguments), (name, &arguments));
}

#[test]
fn detects_the_style_from_the_template() {
    assert_eq!(ToolCallStyle::detect(r#"{{- "[TOOL_CALLS] [" }}"#), ToolCallStyle::Mistral);
    assert_eq!(ToolCallStyle::detect("{{- '\\n<tool_call>\\n' }}"), ToolCallStyle::Hermes);
    let smollm2 = include_str!("../../../../../shared/models/smollm2-135m-instruct/chat_template.jinja");
    assert_eq!(ToolCallStyle::detect(smollm2), ToolCallStyle::Json);
    assert_eq!(ToolCallStyle::detect(""), ToolCallStyle::default());
}

#[test]
fn mistral_array_with_text_around() {
    let text = r#"I'll check both.
[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name":"get_time","arguments":{}}]  "#;
    let p = parse(ToolCallStyle::Mistral, text);
    assert_eq!(p.content, "I'll check both.");
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    assert_call(&p.calls[0], "get_weather", json!({"city": "Paris"}));
    assert_call(&p.calls[1], "get_time", json!({}));
    for call in &p.calls {
        assert!(is_mistral_id(&call.id), "{}", call.id);
    }
    assert_ne!(p.calls[0].id, p.calls[1].id);
    // Text after the calls is content too (whitespace touching a call is dropped).
    let p = parse(ToolCallStyle::Mistral, r#"[TOOL_CALLS][{"name": "search", "arguments": {"q": "x"}}] Done."#);
    assert_eq!((p.content.as_str(), names(&p)), ("Done.", vec!["search"]));
}

#[test]
fn mistral_v11_form_with_and_without_call_ids() {
    let text = r#"[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[CALL_ID]a1b2c3d4e[ARGS]{}"#;
    let p = parse(ToolCallStyle::Mistral, text);
    assert!(p.errors.is_empty() && p.content.is_empty(), "{p:?}");
    assert_call(&p.calls[0], "get_weather", json!({"city": "Paris"}));
    assert_call(&p.calls[1], "get_time", json!({}));
    assert_eq!(p.calls[1].id, "a1b2c3d4e");
    // Tolerated: whitespace around the parts, and arguments without [ARGS].
    let p = parse(ToolCallStyle::Mistral, "[TOOL_CALLS] search [ARGS] {\"q\": \"[ARGS]\"}\n");
    assert_call(&p.calls[0], "search", json!({"q": "[ARGS]"}));
    let p = parse(ToolCallStyle::Mistral, "[TOOL_CALLS]search {\"q\": 1}");
    assert_call(&p.calls[0], "search", json!({"q": 1}));
}

#[test]
fn model_ids_are_kept_when_usable_and_ids_are_unique() {
    let text = r#"[TOOL_CALLS] [{"name": "search", "arguments": {}, "id": "abcdefghi"},
        {"name": "search", "arguments": {}, "id": "abcdefghi"},
        {"name": "search", "arguments": {}, "id": "call_too_long_for_mistral"}]"#;
    let p = parse(ToolCallStyle::Mistral, text);
    assert_eq!(p.calls.len(), 3);
    assert_eq!(p.calls[0].id, "abcdefghi");
    assert!(p.calls[1..].iter().all(|c| is_mistral_id(&c.id) && c.id != "abcdefghi"), "{p:?}");
    assert_ne!(p.calls[1].id, p.calls[2].id);

    let text = r#"{"tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "search", "arguments": "{\"q\": \"a\"}"}},
        {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": {}}}, {"name": "search", "arguments": {}}]}"#;
    let p = parse(ToolCallStyle::Json, text);
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    assert_eq!(p.calls[0].id, "call_1");
    assert_call(&p.calls[0], "search", json!({"q": "a"}));
    for call in &p.calls[1..] {
        assert!(call.id.starts_with("call_") && call.id.len() == 29, "{}", call.id);
        assert!(call.id[5..].bytes().all(|b| b.is_ascii_alphanumeric()));
    }
    assert_ne!(p.calls[1].id, p.calls[2].id);
}

#[test]
fn brackets_quotes_and_tags_inside_strings_do_not_end_a_call() {
    let args = json!({"q": "a ] } [TOOL_CALLS] </tool_call> \" \\\" { [", "n": [1, [2, {"k": "}"}]]});
    let call = json!({"name": "search", "arguments": args}).to_string();
    for (style, text) in [
        (ToolCallStyle::Mistral, format!("[TOOL_CALLS] [{call}]")),
        (ToolCallStyle::Hermes, format!("<tool_call>{call}</tool_call>")),
        (ToolCallStyle::Json, call.clone()),
    ] {
        let p = parse(style, &text);
        assert!(p.errors.is_empty() && p.content.is_empty(), "{style:?}: {p:?}");
        assert_call(&p.calls[0], "search", args.clone());
    }
}

#[test]
fn malformed_and_unbalanced_calls_are_errors() {
    let cases = [
        // Not JSON inside balanced brackets.
        r#"[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": Paris}}]"#,
        // Closing bracket that does not match.
        r#"[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}]]"#,
        // The output ends inside the call.
        r#"[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Par"#,
        "[TOOL_CALLS]get_weather[ARGS]",
        "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\"",
        "[TOOL_CALLS]",
        // Something else after the marker.
        "[TOOL_CALLS] !",
        r#"[TOOL_CALLS]get_weather[ARGS]"Paris""#,
    ];
    for text in cases {
        let p = parse(ToolCallStyle::Mistral, text);
        assert!(p.calls.is_empty() && p.errors.len() == 1, "{text}: {p:?}");
    }
    let p = parse(ToolCallStyle::Mistral, "Hm. [TOOL_CALLS] ! Sorry.");
    assert_eq!((p.content.as_str(), p.errors.len()), ("Hm.! Sorry.", 1));

    let cases = [
        r#"<tool_call>{"name": "get_weather", "arguments": {"city": Paris}}</tool_call>"#,
        r#"<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"]}</tool_call>"#,
        r#"<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}} </tool_call>"#,
        r#"<tool_call>get_weather(city="Paris")</tool_call>"#,
        r#"<tool_call>{"name": "get_weather", "arguments": {"city": "Par"#,
        "<tool_call>",
    ];
    for text in cases {
        let p = parse(ToolCallStyle::Hermes, &format!("{text} after"));
        let complete = text.ends_with("</tool_call>");
        assert!(p.calls.is_empty() && p.errors.len() == 1, "{text}: {p:?}");
        // A closed region ends at its tag; an unclosed one runs to the end of the output.
        assert_eq!(p.content, if complete { "after" } else { "" }, "{text}");
    }
}

#[test]
fn unknown_tools_and_bad_arguments_are_reported_not_dropped() {
    let text = r#"[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}},
        {"name": "launch_rockets", "arguments": {}}, {"name": "search", "arguments": [1, 2]},
        {"name": "search", "arguments": "not json"}, {"arguments": {}}, 7,
        {"name": "search", "parameters": {"q": "p"}}, {"name": "get_time"}]"#;
    let p = parse(ToolCallStyle::Mistral, text);
    assert_eq!(names(&p), ["get_weather", "search", "get_time"]);
    assert_call(&p.calls[1], "search", json!({"q": "p"}));
    assert_call(&p.calls[2], "get_time", json!({}));
    assert_eq!(p.errors.len(), 5, "{:?}", p.errors);
    assert!(p.errors[0].contains("launch_rockets"), "{}", p.errors[0]);
    assert!(p.errors[1].contains("not a JSON object"), "{}", p.errors[1]);

    let p = parse(ToolCallStyle::Hermes, r#"<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>"#);
    assert!(p.calls.is_empty() && p.errors[0].contains("rm_rf"), "{p:?}");
    let p = parse(ToolCallStyle::Json, r#"{"name": "rm_rf", "arguments": {}}"#);
    assert!(p.calls.is_empty() && p.content.is_empty() && p.errors[0].contains("rm_rf"), "{p:?}");
    // With no tools at all, every call is unknown.
    let p = parse_tool_calls(ToolCallStyle::Json, r#"{"name": "search", "arguments": {}}"#, &[]);
    assert!(p.calls.is_empty() && p.errors.len() == 1, "{p:?}");
}

#[test]
fn hermes_calls_with_text_and_missing_closing_tags() {
    let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n\
                <tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
    let p = parse(ToolCallStyle::Hermes, text);
    assert_eq!((p.content.as_str(), names(&p)), ("Let me check.", vec!["get_weather", "get_time"]));
    assert!(p.calls.iter().all(|c| c.id.starts_with("call_") && c.id.len() == 29));
    // Closing tags left out before the next call and at the end still count.
    let text = r#"<tool_call>{"name": "search", "arguments": {"q": 1}}<tool_call>{"name": "search", "arguments": {"q": 2}}</tool_c"#;
    let p = parse(ToolCallStyle::Hermes, text);
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    assert_eq!(p.calls.iter().map(|c| c.arguments["q"].clone()).collect::<Vec<_>>(), [json!(1), json!(2)]);
    // Tags that are not ours are content.
    let p = parse(ToolCallStyle::Hermes, "a <toolbox> b <tool_calls> c <");
    assert_eq!((p.content.as_str(), p.calls.len()), ("a <toolbox> b <tool_calls> c <", 0));
}

#[test]
fn json_style_takes_calls_only_in_the_shape_of_calls() {
    let p = parse(ToolCallStyle::Json, "  {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n");
    assert_eq!((p.content.as_str(), names(&p)), ("", vec!["get_weather"]));
    let p =
        parse(ToolCallStyle::Json, r#"[{"name": "search", "arguments": {}}, {"name": "get_time", "parameters": {}}]"#);
    assert_eq!(names(&p), ["search", "get_time"]);
    // Llama-style calls separated by semicolons, then text.
    let p = parse(
        ToolCallStyle::Json,
        r#"{"name": "search", "parameters": {}}; {"name": "get_time", "parameters": {}} ok"#,
    );
    assert_eq!((p.content.as_str(), names(&p)), ("ok", vec!["search", "get_time"]));
    // Anything else is content, verbatim, and not an error.
    for text in [
        "  Hello {there}",
        r#"{"answer": 42}"#,
        r#"[1, {"name": "search"}]"#,
        r#"{"name": "search", "arguments": {]"#,
        r#"{"name": "search", "arguments": {"#,
        "{not json}",
        "[]",
        " \n ",
        "Text first {\"name\": \"search\", \"arguments\": {}}",
    ] {
        let p = parse(ToolCallStyle::Json, text);
        assert_eq!((p.content.as_str(), p.calls.len(), p.errors.len()), (text, 0, 0), "{text}");
    }
    // Once content started, later JSON is content.
    let p = parse(ToolCallStyle::Json, r#"{"x": 1} {"name": "search", "arguments": {}}"#);
    assert!(p.calls.is_empty());
}

#[test]
fn unicode_survives_everywhere() {
    let text = "Voilà 🌦️ — 天気を調べます。[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich 東京 🚀\"}}] ✓";
    let p = parse(ToolCallStyle::Mistral, text);
    assert_eq!(p.content, "Voilà 🌦️ — 天気を調べます。✓");
    assert_call(&p.calls[0], "get_weather", json!({"city": "Zürich 東京 🚀"}));
    let p = parse(
        ToolCallStyle::Hermes,
        "é<tool_call>{\"name\": \"search\", \"arguments\": {\"q\": \"\\u00e9\"}}</tool_call>é",
    );
    assert_eq!(p.content, "éé");
    assert_call(&p.calls[0], "search", json!({"q": "é"}));
}

#[test]
fn streaming_releases_content_at_once_and_holds_only_possible_markers() {
    let mut s = ToolCallStreamer::with_seed(ToolCallStyle::Mistral, &tools(), 1);
    assert_eq!(s.push("Hello").content, "Hello");
    assert_eq!(s.push(", wor").content, ", wor");
    // " [TOOL" could start a marker (and the space would then touch a call): held.
    assert_eq!(s.push("ld [TOOL").content, "ld");
    let d = s.push("_CALLS] [{\"name\": \"search\", \"arguments\": {\"q\": \"]\"");
    assert!(d.content.is_empty() && d.calls.is_empty());
    let d = s.push("}}]");
    assert_eq!(d.calls.len(), 1);
    assert_call(&d.calls[0], "search", json!({"q": "]"}));
    // Whitespace after a call is dropped even across deltas, and an empty delta changes nothing.
    assert_eq!(s.push("\n").content, "");
    assert_eq!(s.push("").content, "");
    assert_eq!(s.push(" bye").content, "bye");
    assert_eq!(s.finish(), ToolCallParse::default());

    let mut s = ToolCallStreamer::new(ToolCallStyle::Hermes, &tools());
    assert_eq!(s.push("a <").content, "a");
    assert_eq!(s.push("b>").content, " <b>");
    assert_eq!(s.push(" <tool_").content, "");
    assert_eq!(s.finish().content, " <tool_");

    // JSON style: a leading JSON value is held until it closes.
    let mut s = ToolCallStreamer::new(ToolCallStyle::Json, &tools());
    assert_eq!(s.push(" {\"answer\": ").content, "");
    assert_eq!(s.push("42} and").content, " {\"answer\": 42} and");
    assert_eq!(s.push(" more").content, " more");
}

#[test]
fn streaming_split_at_every_boundary_matches_parsing_whole() {
    let texts = [
        (
            ToolCallStyle::Mistral,
            "Sure é. [TOOL_CALLS] [{\"name\": \"search\", \"arguments\": {\"q\": \"[]{}\\\"\"}}]\n ok",
        ),
        (ToolCallStyle::Mistral, "[TOOL_CALLS]get_time[CALL_ID]abcdefghi[ARGS]{} [TOOL_CALLS]x[ARGS]{}[TOOL"),
        (ToolCallStyle::Mistral, "[TOOL_CALLS] ! [TOOL_CALLS] [{\"name\": \"search\"]"),
        (
            ToolCallStyle::Hermes,
            "Hi\n<tool_call>\n{\"name\": \"search\", \"arguments\": {}}\n</tool_call>\n<tool_call>{\"a\": 1}}</tool_call> x",
        ),
        (ToolCallStyle::Hermes, "<tool_call>{\"name\": \"get_time\"}<tool_call>oops</tool_call><tool_call>{"),
        (
            ToolCallStyle::Json,
            " {\"name\": \"search\", \"arguments\": {\"q\": \"}\"}} ; [{\"name\": \"get_time\", \"arguments\": {}}] tail",
        ),
        (ToolCallStyle::Json, " {\"name\": \"search\", \"arguments\": {\"q\": 1}"),
        (ToolCallStyle::Json, "plain 🌍 text [TOOL_CALLS] <tool_call>"),
    ];
    for (style, text) in texts {
        let expected = whole(style, text, 7);
        let n = text.chars().count();
        assert_eq!(streamed(style, text, &[1], 7), expected, "{style:?} char by char: {text}");
        for first in 1..n {
            assert_eq!(streamed(style, text, &[first, n], 7), expected, "{style:?} split at {first}: {text}");
        }
    }
}

const PIECES: &[&str] = &[
    "Hello",
    " ",
    "\n",
    "é",
    "🚀",
    "[",
    "]",
    "{",
    "}",
    "\"",
    "\\",
    ";",
    "<",
    "[TOOL",
    "[TOOL_CALLS]",
    "[TOOL_CALLS] ",
    "[ARGS]",
    "[CALL_ID]abcdefghi",
    "<tool_call>",
    "</tool_call>",
    "get_weather",
    "nope",
    r#"{"name": "get_weather", "arguments": {"city": "P]a\"ris"}}"#,
    r#"[{"name": "get_time", "arguments": {}, "id": "abcdefghi"}]"#,
    r#"{"name": "nope", "arguments": 1}"#,
    r#"{"q": "}"}"#,
    r#"{"tool_calls": [{"function": {"name": "search", "arguments": "{}"}}]}"#,
];

fn style() -> impl Strategy<Value = ToolCallStyle> {
    prop_oneof![Just(ToolCallStyle::Mistral), Just(ToolCallStyle::Hermes), Just(ToolCallStyle::Json)]
}

proptest! {
    #[test]
    fn any_chunking_gives_the_same_result(
        style in style(),
        pieces in prop::collection::vec(prop::sample::select(PIECES), 0..14),
        sizes in prop::collection::vec(1usize..12, 1..8),
        seed in any::<u64>(),
    ) {
        let text = pieces.concat();
        prop_assert_eq!(streamed(style, &text, &sizes, seed), whole(style, &text, seed));
    }

    #[test]
    fn text_without_markers_is_content_verbatim(text in "[^\\[<{]*", style in style()) {
        let p = parse(style, &text);
        prop_assert_eq!(p.content, text);
        prop_assert!(p.calls.is_empty() && p.errors.is_empty());
    }

    #[test]
    fn arbitrary_text_never_panics_and_ids_are_unique(text in "\\PC*", style in style()) {
        let p = parse(style, &text);
        let ids: HashSet<&str> = p.calls.iter().map(|c| c.id.as_str()).collect();
        prop_assert_eq!(ids.len(), p.calls.len());
        prop_assert!(p.calls.iter().all(|c| c.arguments.is_object()));
    }
}
