//! Hugging Face chat templates rendered with `minijinja`.
//!
//! Compatible with `transformers`' `apply_chat_template`: blocks are trimmed (`trim_blocks`,
//! `lstrip_blocks`), Python string methods work through `minijinja-contrib`'s pycompat
//! callback, and templates may call `raise_exception(msg)` (a render error carrying `msg`) and
//! `strftime_now(fmt)`. The context is what transformers gives a template: `messages` (assistant
//! turns may carry `tool_calls` as `{"id", "type": "function", "function": {"name",
//! "arguments"}}` with `arguments` an object, tool turns `tool_call_id` and `name`), `tools` (as
//! `{"type": "function", "function": {"name", "description", "parameters"}}`, or `none` when there
//! are none), `documents` (`none`), `add_generation_prompt`, `bos_token` and `eos_token`.
//! `tojson` is transformers' own (`pyjson`), so tool schemas reach the model byte for byte as
//! with transformers; `strftime_now` is Python's `strftime` in UTC (`strftime`).
//! Invariant: a template that compiled once renders without touching the environment again (the
//! compiled form is shared, rendering is `&self`).

use minijinja::{Environment, Error, ErrorKind, Value, context};
use serde::{Serialize, Serializer};

use crate::text::tools::{ParsedToolCall, ToolSpec};

mod pyjson;
mod strftime;

/// Template compilation or rendering failure.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template source does not compile.
    #[error("chat template does not compile: {0}")]
    Compile(String),
    /// Rendering failed (including `raise_exception` from the template itself).
    #[error("chat template: {0}")]
    Render(String),
}

/// One chat message, serialized the way transformers hands messages to a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text (empty for an assistant turn that only calls tools).
    pub content: String,
    /// Assistant turns: the tools it called (absent from the template's view when empty).
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "hf_tool_calls")]
    pub tool_calls: Vec<ParsedToolCall>,
    /// Tool turns: the id of the call this answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// Tool turns: the tool's name; other turns: an optional participant name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    /// A message with the given role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        }
    }

    /// This message with the tool calls an assistant made.
    pub fn with_tool_calls(mut self, calls: Vec<ParsedToolCall>) -> Self {
        self.tool_calls = calls;
        self
    }

    /// This message as the answer to tool call `id`.
    pub fn with_tool_call_id(mut self, id: impl Into<String>) -> Self {
        self.tool_call_id = Some(id.into());
        self
    }

    /// This message with a `name`.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
}

/// OpenAI's shape of a call, as templates read it (`tool_call.function.arguments` an object).
fn hf_tool_calls<S: Serializer>(calls: &[ParsedToolCall], serializer: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Function<'a> {
        name: &'a str,
        arguments: &'a serde_json::Value,
    }
    #[derive(Serialize)]
    struct Call<'a> {
        id: &'a str,
        #[serde(rename = "type")]
        kind: &'static str,
        function: Function<'a>,
    }
    serializer.collect_seq(calls.iter().map(|c| Call {
        id: &c.id,
        kind: "function",
        function: Function { name: &c.name, arguments: &c.arguments },
    }))
}

/// OpenAI's shape of a tool, as templates read it.
#[derive(Serialize)]
struct HfTool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: HfFunction<'a>,
}

#[derive(Serialize)]
struct HfFunction<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    description: &'a str,
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    parameters: &'a serde_json::Value,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

const TEMPLATE_NAME: &str = "chat";

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are the strings templates may insert.
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TemplateError::Compile(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime::strftime_now);
        env.add_filter("tojson", pyjson::tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string()).map_err(|e| TemplateError::Compile(e.to_string()))?;
        Ok(ChatTemplate { env, bos_token: bos_token.unwrap_or_default(), eos_token: eos_token.unwrap_or_default() })
    }

    /// Renders a conversation without tools; with `add_generation_prompt` the text ends where the
    /// assistant's reply begins.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, TemplateError> {
        self.render_with_tools(messages, &[], add_generation_prompt)
    }

    /// Renders a conversation with the tools the model may call (`tools` is `none` to the
    /// template when the slice is empty, as when transformers gets no tools).
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| TemplateError::Render(e.to_string()))?;
        let tools: Option<Vec<HfTool<'_>>> = (!tools.is_empty()).then(|| {
            tools
                .iter()
                .map(|t| HfTool {
                    kind: "function",
                    function: HfFunction { name: &t.name, description: &t.description, parameters: &t.parameters },
                })
                .collect()
        });
        template
            .render(context! {
                messages => Value::from(minijinja::value::Serde(messages)),
                tools => Value::from(minijinja::value::Serde(&tools)),
                documents => Value::from(()),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| TemplateError::Render(render_message(&e)))
    }
}

/// A template's own `raise_exception` message is the useful part; keep it whole.
fn render_message(e: &Error) -> String {
    match e.detail() {
        Some(detail) if e.kind() == ErrorKind::InvalidOperation => detail.to_string(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::text::tools::{ToolCallStyle, parse_tool_calls};

    const SMOLLM2: &str = include_str!("../../../shared/models/smollm2-135m-instruct/chat_template.jinja");
    const SMOLLM2_CONFIG: &str = include_str!("../../../shared/models/smollm2-135m-instruct/tokenizer_config.json");

    /// Modelled on Mistral-7B-Instruct-v0.3's tool template (not a copy): tools in
    /// `[AVAILABLE_TOOLS]` before the last user turn, calls after `[TOOL_CALLS]` with 9-character
    /// ids, results in `[TOOL_RESULTS]`.
    const MISTRAL_V3: &str = r##"{#- Test fixture modelled on Mistral's v3 (7B-Instruct-v0.3) tool template. -#}
{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}
{%- for message in loop_messages | rejectattr("role", "equalto", "tool") | selectattr("tool_calls", "undefined") %}
    {%- if (message["role"] == "user") != (loop.index0 % 2 == 0) %}
        {{- raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}{{- ", " }}{%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}{{- ", " }}{%- else %}{{- "]" }}{%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}{{- ", " }}{%- else %}{{- "]" + eos_token }}{%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token }}
    {%- elif message["role"] == "tool" %}
        {{- '[TOOL_RESULTS] {"content": ' + message.content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user, assistant and tool roles are supported after an optional system message!") }}
    {%- endif %}
{%- endfor %}
"##;

    /// Modelled on the Hermes / Qwen2.5 tool template: tools as JSON lines in `<tools>`, calls in
    /// `<tool_call>` tags, results in `<tool_response>` inside a user turn.
    const HERMES: &str = r##"{#- Test fixture modelled on the Hermes / Qwen2.5 tool template. -#}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions. Function signatures are within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each call, return a JSON object with the function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' }}
            {%- if tool_call.arguments is string %}
                {{- tool_call.arguments }}
            {%- else %}
                {{- tool_call.arguments | tojson }}
            {%- endif %}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.index0 == 0 or messages[loop.index0 - 1].role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != "tool" %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"##;

    /// The expected outputs below are what Python's Jinja2 renders with transformers' template
    /// environment (trim/lstrip blocks, loop controls, its `tojson`, `raise_exception`).
    fn tools() -> Vec<ToolSpec> {
        // Keys in sorted order: without serde_json's `preserve_order` (a router-only build) maps
        // come out sorted, with it (the workspace build) in insertion order.
        vec![
            ToolSpec {
                name: "get_weather".into(),
                description: "Get the user's weather <now> & later".into(),
                parameters: json!({
                    "properties": {
                        "city": {"description": "City, e.g. Zürich", "type": "string"},
                        "days": {"maximum": 1.5e16, "minimum": 0.5, "type": "integer"},
                    },
                    "required": ["city"],
                    "type": "object",
                }),
            },
            ToolSpec {
                name: "get_time".into(),
                description: String::new(),
                parameters: json!({"properties": {}, "type": "object"}),
            },
        ]
    }

    fn conversation() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Weather in Zürich?"),
            ChatMessage::new("assistant", "").with_tool_calls(vec![
                ParsedToolCall {
                    id: "abcDEF123".into(),
                    name: "get_weather".into(),
                    arguments: json!({"city": "Zürich", "days": 2}),
                },
                ParsedToolCall { id: "xyz987UVW".into(), name: "get_time".into(), arguments: json!({}) },
            ]),
            ChatMessage::new("tool", r#"{"temp": "21°C"}"#).with_tool_call_id("abcDEF123").with_name("get_weather"),
            ChatMessage::new("tool", "12:00").with_tool_call_id("xyz987UVW").with_name("get_time"),
            ChatMessage::new("assistant", "21°C at noon."),
            ChatMessage::new("user", "Thanks!"),
        ]
    }

    #[test]
    fn smollm2_template_matches_transformers() {
        let t = ChatTemplate::new(SMOLLM2, None, Some("<|im_end|>".into())).unwrap();
        let text = t.render(&[ChatMessage::new("user", "What is the capital of France?")], true).unwrap();
        // What transformers' apply_chat_template produces for this template.
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
        let with_system =
            t.render(&[ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi")], false).unwrap();
        assert_eq!(with_system, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
    }

    #[test]
    fn smollm2_from_tokenizer_config_renders_tool_turns_as_text() {
        let config: serde_json::Value = serde_json::from_str(SMOLLM2_CONFIG).unwrap();
        let source = config["chat_template"].as_str().unwrap();
        assert_eq!(source, SMOLLM2);
        let bos = config["bos_token"].as_str().map(str::to_string);
        let eos = config["eos_token"].as_str().map(str::to_string);
        let t = ChatTemplate::new(source, bos, eos).unwrap();
        // SmolLM2's template knows nothing of tools: the calls vanish, tool results are turns.
        let text = t.render_with_tools(&conversation(), &tools(), true).unwrap();
        assert_eq!(text, SMOL0);
        assert_eq!(t.render(&conversation(), true).unwrap(), text);
    }

    #[test]
    fn mistral_v3_style_template_matches_transformers() {
        let t = ChatTemplate::new(MISTRAL_V3, Some("<s>".into()), Some("</s>".into())).unwrap();
        let conversation = conversation();
        assert_eq!(t.render_with_tools(&conversation, &tools(), true).unwrap(), MISTRAL0);
        assert_eq!(t.render_with_tools(&conversation[..2], &tools(), true).unwrap(), MISTRAL1);
        // No tools: `tools` is none, so no [AVAILABLE_TOOLS] block at all.
        assert_eq!(t.render(&conversation[..2], true).unwrap(), MISTRAL2);
        assert_eq!(t.render_with_tools(&conversation[..2], &[], true).unwrap(), MISTRAL2);
    }

    #[test]
    fn mistral_template_rejects_ids_it_cannot_use_and_accepts_the_ids_we_make() {
        let t = ChatTemplate::new(MISTRAL_V3, Some("<s>".into()), Some("</s>".into())).unwrap();
        let mut messages = conversation();
        messages[2].tool_calls[0].id = "call_0123456789".into();
        let err = t.render_with_tools(&messages, &tools(), true).unwrap_err();
        assert!(err.to_string().contains("Tool call IDs should be alphanumeric strings with length 9!"), "{err}");

        // A call parsed from Mistral output goes back into the next prompt as it came out.
        let output =
            r#"Let me look. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Zürich", "days": 1}}]"#;
        let parsed = parse_tool_calls(ToolCallStyle::Mistral, output, &tools());
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let id = parsed.calls[0].id.clone();
        let messages = vec![
            ChatMessage::new("user", "Weather in Zürich?"),
            ChatMessage::new("assistant", parsed.content).with_tool_calls(parsed.calls),
            ChatMessage::new("tool", "21").with_tool_call_id(id.clone()).with_name("get_weather"),
        ];
        let text = t.render_with_tools(&messages, &tools(), false).unwrap();
        let call = format!(
            r#"[TOOL_CALLS] [{{"name": "get_weather", "arguments": {{"city": "Zürich", "days": 1}}, "id": "{id}"}}]</s>"#
        );
        assert!(text.contains(&call), "{text}");
        assert!(
            text.ends_with(&format!(r#"[TOOL_RESULTS] {{"content": 21, "call_id": "{id}"}}[/TOOL_RESULTS]"#)),
            "{text}"
        );
    }

    #[test]
    fn hermes_style_template_matches_transformers() {
        let t = ChatTemplate::new(HERMES, None, Some("<|im_end|>".into())).unwrap();
        let conversation = conversation();
        assert_eq!(t.render_with_tools(&conversation, &tools(), true).unwrap(), HERMES0);
        assert_eq!(t.render(&conversation[..2], true).unwrap(), HERMES1);
        // What the model writes back parses into the same call.
        let start = HERMES0.find("<tool_call>\n{\"name\": \"get_weather\"").unwrap();
        let end = HERMES0[start..].find("<|im_end|>").unwrap() + start;
        let parsed = parse_tool_calls(ToolCallStyle::Hermes, &HERMES0[start..end], &tools());
        assert!(parsed.errors.is_empty() && parsed.content.is_empty(), "{parsed:?}");
        let names: Vec<&str> = parsed.calls.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["get_weather", "get_time"]);
        assert_eq!(parsed.calls[0].arguments, json!({"city": "Zürich", "days": 2}));
    }

    #[test]
    fn template_context_is_what_transformers_gives() {
        // Expected: Jinja2 with transformers' arguments (booleans print the Python way).
        let src = "{{ tools is none }} {{ documents is none }} {{ add_generation_prompt }} [{{ bos_token }}|{{ eos_token }}]\
                   {% for m in messages %} {{ m.role }}:{{ m.tool_calls is defined }}:{{ m.tool_call_id is defined }}:{{ m.name is defined }}\
                   {% if m.tool_calls %}={{ m.tool_calls[0].type }}/{{ m.tool_calls[0].function.arguments.city }}{% endif %}{% endfor %}\
                   {% if tools %} {{ tools[1].function is mapping }}:{{ tools[1].function.description is defined }}{% endif %}";
        let t = ChatTemplate::new(src, Some("<s>".into()), Some("</s>".into())).unwrap();
        let messages = &conversation()[1..4];
        assert_eq!(
            t.render(messages, false).unwrap(),
            "True True False [<s>|</s>] user:False:False:False assistant:True:False:False=function/Zürich tool:False:True:True"
        );
        assert_eq!(
            t.render_with_tools(messages, &tools(), true).unwrap(),
            "False True True [<s>|</s>] user:False:False:False assistant:True:False:False=function/Zürich tool:False:True:True \
             True:False"
        );
    }

    #[test]
    fn tojson_is_pythons_json_dumps() {
        let src = r##"{%- set x = {"b": [1, 2.0, 0.1, 1e-05, 1e16, 123456789012345678, -0.0, 1.5e-7, 100.0, 1e15, true, none], "a": s, "c": {}, "d": [], "e": {"z": {"y": [[]]}}} -%}
{{ x|tojson }}|{{ x|tojson(indent=2) }}|{{ x|tojson(sort_keys=true, separators=(',', ':')) }}|{{ x|tojson(ensure_ascii=true) }}|{{ x|tojson(indent='\t') }}"##;
        let t = ChatTemplate::new(src, None, None).unwrap();
        let template = t.env.get_template(TEMPLATE_NAME).unwrap();
        let text = template.render(context! { s => "q\"\\/\n\t\u{1}\u{7f} é 😀 <'&>" }).unwrap();
        assert_eq!(text, TOJSON_OUT);
        let err = ChatTemplate::new("{{ nothing|tojson }}", None, None).unwrap().render(&[], false).unwrap_err();
        assert!(err.to_string().contains("not JSON serializable"), "{err}");
    }

    #[test]
    fn raise_exception_and_python_methods() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}\
                   {{ bos_token }}{{ messages[0]['content'].strip().upper() }}";
        let t = ChatTemplate::new(src, Some("<s>".into()), None).unwrap();
        assert_eq!(t.render(&[ChatMessage::new("user", "  hi ")], false).unwrap(), "<s>HI");
        let err = t.render(&[ChatMessage::new("assistant", "x")], false).unwrap_err();
        assert!(err.to_string().contains("first message must be from the user"), "{err}");
        assert!(ChatTemplate::new("{% if %}", None, None).is_err());
        let t = ChatTemplate::new("{{ strftime_now('%Y') }}", None, None).unwrap();
        assert_eq!(t.render(&[], false).unwrap().len(), 4);
    }

    const SMOL0: &str = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWeather in Zürich?<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n<|im_start|>tool\n{\"temp\": \"21°C\"}<|im_end|>\n<|im_start|>tool\n12:00<|im_end|>\n<|im_start|>assistant\n21°C at noon.<|im_end|>\n<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n";
    const MISTRAL0: &str = "<s>[INST] Weather in Zürich?[/INST][TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\", \"days\": 2}, \"id\": \"abcDEF123\"}, {\"name\": \"get_time\", \"arguments\": {}, \"id\": \"xyz987UVW\"}]</s>[TOOL_RESULTS] {\"content\": {\"temp\": \"21°C\"}, \"call_id\": \"abcDEF123\"}[/TOOL_RESULTS][TOOL_RESULTS] {\"content\": 12:00, \"call_id\": \"xyz987UVW\"}[/TOOL_RESULTS] 21°C at noon.</s>[AVAILABLE_TOOLS] [{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Get the user's weather <now> & later\", \"parameters\": {\"properties\": {\"city\": {\"description\": \"City, e.g. Zürich\", \"type\": \"string\"}, \"days\": {\"maximum\": 1.5e+16, \"minimum\": 0.5, \"type\": \"integer\"}}, \"required\": [\"city\"], \"type\": \"object\"}}}, {\"type\": \"function\", \"function\": {\"name\": \"get_time\", \"parameters\": {\"properties\": {}, \"type\": \"object\"}}}][/AVAILABLE_TOOLS][INST] Be brief.\n\nThanks![/INST]";
    const MISTRAL1: &str = "<s>[AVAILABLE_TOOLS] [{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Get the user's weather <now> & later\", \"parameters\": {\"properties\": {\"city\": {\"description\": \"City, e.g. Zürich\", \"type\": \"string\"}, \"days\": {\"maximum\": 1.5e+16, \"minimum\": 0.5, \"type\": \"integer\"}}, \"required\": [\"city\"], \"type\": \"object\"}}}, {\"type\": \"function\", \"function\": {\"name\": \"get_time\", \"parameters\": {\"properties\": {}, \"type\": \"object\"}}}][/AVAILABLE_TOOLS][INST] Be brief.\n\nWeather in Zürich?[/INST]";
    const MISTRAL2: &str = "<s>[INST] Be brief.\n\nWeather in Zürich?[/INST]";
    const HERMES0: &str = "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions. Function signatures are within <tools></tools> XML tags:\n<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Get the user's weather <now> & later\", \"parameters\": {\"properties\": {\"city\": {\"description\": \"City, e.g. Zürich\", \"type\": \"string\"}, \"days\": {\"maximum\": 1.5e+16, \"minimum\": 0.5, \"type\": \"integer\"}}, \"required\": [\"city\"], \"type\": \"object\"}}}\n{\"type\": \"function\", \"function\": {\"name\": \"get_time\", \"parameters\": {\"properties\": {}, \"type\": \"object\"}}}\n</tools>\n\nFor each call, return a JSON object with the function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nWeather in Zürich?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\", \"days\": 2}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{\"temp\": \"21°C\"}\n</tool_response>\n<tool_response>\n12:00\n</tool_response><|im_end|>\n<|im_start|>assistant\n21°C at noon.<|im_end|>\n<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n";
    const HERMES1: &str = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWeather in Zürich?<|im_end|>\n<|im_start|>assistant\n";
    const TOJSON_OUT: &str = "{\"b\": [1, 2.0, 0.1, 1e-05, 1e+16, 123456789012345678, -0.0, 1.5e-07, 100.0, 1000000000000000.0, true, null], \"a\": \"q\\\"\\\\/\\n\\t\\u0001\u{7f} é 😀 <'&>\", \"c\": {}, \"d\": [], \"e\": {\"z\": {\"y\": [[]]}}}|{\n  \"b\": [\n    1,\n    2.0,\n    0.1,\n    1e-05,\n    1e+16,\n    123456789012345678,\n    -0.0,\n    1.5e-07,\n    100.0,\n    1000000000000000.0,\n    true,\n    null\n  ],\n  \"a\": \"q\\\"\\\\/\\n\\t\\u0001\u{7f} é 😀 <'&>\",\n  \"c\": {},\n  \"d\": [],\n  \"e\": {\n    \"z\": {\n      \"y\": [\n        []\n      ]\n    }\n  }\n}|{\"a\":\"q\\\"\\\\/\\n\\t\\u0001\u{7f} é 😀 <'&>\",\"b\":[1,2.0,0.1,1e-05,1e+16,123456789012345678,-0.0,1.5e-07,100.0,1000000000000000.0,true,null],\"c\":{},\"d\":[],\"e\":{\"z\":{\"y\":[[]]}}}|{\"b\": [1, 2.0, 0.1, 1e-05, 1e+16, 123456789012345678, -0.0, 1.5e-07, 100.0, 1000000000000000.0, true, null], \"a\": \"q\\\"\\\\/\\n\\t\\u0001\\u007f \\u00e9 \\ud83d\\ude00 <'&>\", \"c\": {}, \"d\": [], \"e\": {\"z\": {\"y\": [[]]}}}|{\n\t\"b\": [\n\t\t1,\n\t\t2.0,\n\t\t0.1,\n\t\t1e-05,\n\t\t1e+16,\n\t\t123456789012345678,\n\t\t-0.0,\n\t\t1.5e-07,\n\t\t100.0,\n\t\t1000000000000000.0,\n\t\ttrue,\n\t\tnull\n\t],\n\t\"a\": \"q\\\"\\\\/\\n\\t\\u0001\u{7f} é 😀 <'&>\",\n\t\"c\": {},\n\t\"d\": [],\n\t\"e\": {\n\t\t\"z\": {\n\t\t\t\"y\": [\n\t\t\t\t[]\n\t\t\t]\n\t\t}\n\t}\n}";
}
