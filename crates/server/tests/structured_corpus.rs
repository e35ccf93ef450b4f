//! Structured outputs proven over a corpus (tests/fixtures/structured/): JSON schemas of the
//! kinds clients send (OCR of receipts and forms, extraction, configs, tool arguments,
//! recursive trees), regular expressions, choices and Lark grammars. The demo checkpoint's
//! random weights never write JSON by themselves, so every bit of structure in its answers is
//! the grammar's: if the constraint leaks anywhere, these answers show it.
//!
//! Every answer is judged by a checker that shares nothing with llguidance's grammar: answers
//! that finish with `stop` must be whole (JSON that parses and validates against its schema
//! with the `jsonschema` crate, formats included; a full regex match; one of the choices; a
//! sentence of the Lark grammar's language by a recognizer written here), and answers cut by
//! `max_tokens` must be prefixes of such (an incremental JSON syntax checker, a minimized DFA,
//! a prefix of a choice, the recognizers again). What is judged is the stream's text, every
//! `Token` event's text and then the `Finished` one's, and it must be the bytes of the tokens
//! the grammar consumed. The same with `n = 4`, and a batch that mixes constrained and free
//! greedy requests gives each exactly its tokens alone.

mod common;

use common::{demo_source, root};
use internvl_model::prompt::{ChatMessage, Role};
use internvl_scheduler::{Event, FinishReason, GrammarSpec, SamplingParams, StopParams};
use internvl_server::service::kv_cache::KvCacheSize;
use internvl_server::service::model::Progress;
use internvl_server::service::request::{request, Generation};
use internvl_server::service::{EngineShape, Service};
use regex_automata::dfa::{dense, Automaton};
use regex_automata::util::start;
use regex_automata::{Anchored, MatchKind};
use serde_json::Value;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// Enough for every corpus answer that the grammar can close to close, most of the time:
/// measured, 256 cut a quarter of the JSON answers (the long receipts and orders), 384 a tenth.
const MAX_TOKENS: usize = 384;

/// The seeds of the sampled runs (temperature 1), beside the greedy one.
const SEEDS: [u64; 2] = [7, 1234];

/// One Service for every test of this file, used by one test at a time: the mixed batch's
/// solo runs must really be alone in the engine.
fn service() -> MutexGuard<'static, Service> {
    static SERVICE: OnceLock<Mutex<Service>> = OnceLock::new();
    SERVICE
        .get_or_init(|| {
            let loaded = demo_source().load(Progress::Quiet).unwrap();
            let shape = EngineShape {
                block_size: 16,
                max_model_len: Some(1024),
                // 256 running sequences (the engine's most) of 512 tokens, prompt and answer.
                kv_cache: KvCacheSize::Blocks(256 * 512 / 16),
            };
            Mutex::new(Service::start(loaded, &shape, |_| {}).unwrap())
        })
        .lock()
        // A failed test must not fail the others with it.
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One entry of the corpus.
struct Case {
    name: String,
    /// `json_schema`, `regex`, `choice` or `lark`.
    kind: &'static str,
    prompt: String,
    spec: GrammarSpec,
    check: Check,
}

/// How an answer is judged, independently of the grammar that produced it.
enum Check {
    Schema(Box<jsonschema::Validator>),
    Regex {
        whole: regex::Regex,
        /// Anchored, all matches kept, minimized: its dead state is exactly "no extension of
        /// this text matches".
        dfa: Box<dense::DFA<Vec<u32>>>,
    },
    Choice(Vec<String>),
    Lark(Language),
}

/// The languages of the Lark cases, each with its recognizer below.
#[derive(Clone, Copy)]
enum Language {
    Arithmetic,
    CsvRow,
    KeyValues,
    SExpression,
}

fn corpus_dir() -> std::path::PathBuf {
    root().join("tests/fixtures/structured")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn field<'a>(entry: &'a Value, name: &str) -> &'a str {
    entry[name]
        .as_str()
        .unwrap_or_else(|| panic!("corpus entry without `{name}`: {entry}"))
}

/// The corpus: every schema of json_schemas/, then the cases of regex.json, choice.json and
/// lark.json.
fn corpus() -> Vec<Case> {
    let mut cases = Vec::new();
    let mut schemas: Vec<_> = std::fs::read_dir(corpus_dir().join("json_schemas"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    schemas.sort();
    for path in schemas {
        let schema = read_json(&path);
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        cases.push(Case {
            name: path.file_stem().unwrap().to_string_lossy().into_owned(),
            kind: "json_schema",
            prompt: format!("{}. Answer with JSON only.", field(&schema, "title")),
            spec: GrammarSpec::JsonSchema(schema),
            check: Check::Schema(Box::new(validator)),
        });
    }
    for entry in entries("regex.json") {
        let pattern = field(&entry, "pattern");
        let dfa = dense::Builder::new()
            .configure(
                dense::Config::new()
                    .match_kind(MatchKind::All)
                    .start_kind(regex_automata::dfa::StartKind::Anchored)
                    .minimize(true),
            )
            .build(pattern)
            .unwrap();
        cases.push(Case {
            name: field(&entry, "name").into(),
            kind: "regex",
            prompt: field(&entry, "prompt").into(),
            spec: GrammarSpec::Regex(pattern.into()),
            check: Check::Regex {
                whole: regex::Regex::new(&format!("^(?:{pattern})$")).unwrap(),
                dfa: Box::new(dfa),
            },
        });
    }
    for entry in entries("choice.json") {
        let choices: Vec<String> = serde_json::from_value(entry["choices"].clone()).unwrap();
        cases.push(Case {
            name: field(&entry, "name").into(),
            kind: "choice",
            prompt: field(&entry, "prompt").into(),
            spec: GrammarSpec::Choice(choices.clone()),
            check: Check::Choice(choices),
        });
    }
    for entry in entries("lark.json") {
        let language = match field(&entry, "language") {
            "arithmetic" => Language::Arithmetic,
            "csv_row" => Language::CsvRow,
            "key_values" => Language::KeyValues,
            "s_expression" => Language::SExpression,
            other => panic!("no recognizer for the language {other}"),
        };
        cases.push(Case {
            name: field(&entry, "name").into(),
            kind: "lark",
            prompt: field(&entry, "prompt").into(),
            spec: GrammarSpec::Lark(field(&entry, "grammar").into()),
            check: Check::Lark(language),
        });
    }
    cases
}

fn entries(file: &str) -> Vec<Value> {
    match read_json(&corpus_dir().join(file)) {
        Value::Array(entries) => entries,
        other => panic!("{file} must be a list of cases, got {other}"),
    }
}

/// What a recognizer makes of a text.
#[derive(Debug, PartialEq)]
enum Verdict {
    /// A whole sentence of the language (and so a prefix of one too).
    Whole,
    /// Not whole, but some continuation makes it one.
    Prefix,
    /// No continuation makes it one: why.
    Invalid(String),
}

impl Check {
    /// Judges `text`: `whole` when it finished with stop (it must be a whole answer), else a
    /// prefix suffices. `Err` says what is wrong with it.
    fn judge(&self, text: &str, whole: bool) -> Result<(), String> {
        let verdict = match self {
            Check::Schema(validator) => match serde_json::from_str::<Value>(text) {
                Ok(value) => {
                    let errors: Vec<String> = validator
                        .iter_errors(&value)
                        .map(|e| format!("{e} at {}", e.instance_path))
                        .collect();
                    if errors.is_empty() {
                        Verdict::Whole
                    } else {
                        Verdict::Invalid(errors.join("; "))
                    }
                }
                // A number past f64 (`5e1459`) is JSON, but not JSON every reader holds: the
                // server keeps numbers within I-JSON's range, so it fails here too.
                Err(e) if whole => Verdict::Invalid(format!("not JSON serde_json holds: {e}")),
                Err(_) => json_prefix(text),
            },
            Check::Regex { whole: rx, dfa } => {
                if rx.is_match(text) {
                    Verdict::Whole
                } else if dfa_allows(dfa, text) {
                    Verdict::Prefix
                } else {
                    Verdict::Invalid("no continuation matches the regex".into())
                }
            }
            Check::Choice(choices) => {
                if choices.iter().any(|c| c == text) {
                    Verdict::Whole
                } else if choices.iter().any(|c| c.starts_with(text)) {
                    Verdict::Prefix
                } else {
                    Verdict::Invalid("not a prefix of any choice".into())
                }
            }
            Check::Lark(language) => recognize(*language, text),
        };
        match verdict {
            Verdict::Whole => Ok(()),
            Verdict::Prefix if !whole => Ok(()),
            Verdict::Prefix => Err("finished with stop but only a prefix".into()),
            Verdict::Invalid(why) => Err(why),
        }
    }
}

/// Whether some continuation of `text` matches: the anchored DFA never reaches its dead state
/// on `text`'s bytes.
fn dfa_allows(dfa: &dense::DFA<Vec<u32>>, text: &str) -> bool {
    let mut state = dfa
        .start_state(&start::Config::new().anchored(Anchored::Yes))
        .unwrap();
    for &byte in text.as_bytes() {
        state = dfa.next_state(state, byte);
        if dfa.is_dead_state(state) {
            return false;
        }
    }
    true
}

/// Where a JSON syntax checker is between two characters.
#[derive(Debug, Clone, Copy, PartialEq)]
enum JsonState {
    /// A value must come (after `:`, `,` in an array, or at the start).
    Value,
    /// Just after `[`: a value or `]`.
    FirstItem,
    /// Just after `{`: a key or `}`.
    FirstKey,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value: `,` or the closing bracket, or nothing more at the top level.
    AfterValue,
    /// In a string (a key when `key`), after a backslash when `escape`, in `\uXXXX` with
    /// `hex` digits still to come.
    Str { key: bool, escape: bool, hex: u8 },
    /// In a number: what may follow.
    Number(NumberState),
    /// In `true`, `false` or `null`: the rest of the word.
    Literal(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum NumberState {
    Minus,
    Zero,
    Integer,
    Dot,
    Fraction,
    Exponent,
    ExponentSign,
    ExponentDigits,
}

impl NumberState {
    /// The state after `c`, or `None` when `c` cannot continue the number.
    fn next(self, c: char) -> Option<NumberState> {
        use NumberState::*;
        let digit = c.is_ascii_digit();
        Some(match (self, c) {
            (Minus, '0') => Zero,
            (Minus, _) if digit => Integer,
            (Integer, _) if digit => Integer,
            (Zero | Integer, '.') => Dot,
            (Dot | Fraction, _) if digit => Fraction,
            (Zero | Integer | Fraction, 'e' | 'E') => Exponent,
            (Exponent, '+' | '-') => ExponentSign,
            (Exponent | ExponentSign | ExponentDigits, _) if digit => ExponentDigits,
            _ => return None,
        })
    }

    /// Whether the number may end here.
    fn complete(self) -> bool {
        matches!(
            self,
            NumberState::Zero
                | NumberState::Integer
                | NumberState::Fraction
                | NumberState::ExponentDigits
        )
    }
}

/// Whether `text` is a prefix of a JSON text (RFC 8259): a pushdown automaton over its
/// characters that fails at the first one no JSON text could have there. Every state it can
/// be in has a continuation, so not failing means some continuation is JSON.
fn json_prefix(text: &str) -> Verdict {
    use JsonState::*;
    let mut stack: Vec<char> = Vec::new(); // '{' or '['
    let mut state = Value;
    for (at, c) in text.char_indices() {
        let fail = |what: &str| Verdict::Invalid(format!("{what} at byte {at}: {c:?}"));
        let ws = matches!(c, ' ' | '\t' | '\n' | '\r');
        // A number ends at the first character that cannot continue it, which is then read
        // as what follows the value.
        if let Number(n) = state {
            match n.next(c) {
                Some(next) => {
                    state = Number(next);
                    continue;
                }
                None if n.complete() => state = AfterValue,
                None => return fail("unfinished number"),
            }
        }
        state = match state {
            Str {
                key, escape: true, ..
            } => match c {
                'u' => Str {
                    key,
                    escape: false,
                    hex: 4,
                },
                '"' | '\\' | '/' | 'b' | 'f' | 'n' | 'r' | 't' => Str {
                    key,
                    escape: false,
                    hex: 0,
                },
                _ => return fail("bad escape"),
            },
            Str { key, hex, .. } if hex > 0 => {
                if !c.is_ascii_hexdigit() {
                    return fail("bad \\u escape");
                }
                Str {
                    key,
                    escape: false,
                    hex: hex - 1,
                }
            }
            Str { key, .. } => match c {
                '"' if key => Colon,
                '"' => AfterValue,
                '\\' => Str {
                    key,
                    escape: true,
                    hex: 0,
                },
                c if (c as u32) < 0x20 => return fail("control character in a string"),
                _ => state,
            },
            Literal(rest) => {
                let mut chars = rest.chars();
                if chars.next() != Some(c) {
                    return fail("bad literal");
                }
                match chars.as_str() {
                    "" => AfterValue,
                    rest => Literal(rest),
                }
            }
            _ if ws => state,
            Value | FirstItem => match c {
                '{' => {
                    stack.push('{');
                    FirstKey
                }
                '[' => {
                    stack.push('[');
                    FirstItem
                }
                '"' => Str {
                    key: false,
                    escape: false,
                    hex: 0,
                },
                '-' => Number(NumberState::Minus),
                '0' => Number(NumberState::Zero),
                '1'..='9' => Number(NumberState::Integer),
                't' => Literal("rue"),
                'f' => Literal("alse"),
                'n' => Literal("ull"),
                ']' if state == FirstItem => {
                    stack.pop();
                    AfterValue
                }
                _ => return fail("expected a value"),
            },
            FirstKey | Key => match c {
                '"' => Str {
                    key: true,
                    escape: false,
                    hex: 0,
                },
                '}' if state == FirstKey => {
                    stack.pop();
                    AfterValue
                }
                _ => return fail("expected a key"),
            },
            Colon if c == ':' => Value,
            Colon => return fail("expected ':'"),
            AfterValue => match (stack.last(), c) {
                (Some('{'), ',') => Key,
                (Some('['), ',') => Value,
                (Some('{'), '}') | (Some('['), ']') => {
                    stack.pop();
                    AfterValue
                }
                _ => return fail("expected ',' or the end of the container"),
            },
            Number(_) => unreachable!("numbers are handled above"),
        };
    }
    if stack.is_empty() && matches!(state, AfterValue)
        || matches!(state, Number(n) if n.complete() && stack.is_empty())
    {
        Verdict::Whole
    } else {
        Verdict::Prefix
    }
}

/// The Lark cases' languages, recognized character by character. Each is a finite automaton
/// plus a depth counter where the language nests, and each recognizer's every live state has
/// a continuation to a whole sentence, so "not invalid" means "a prefix".
fn recognize(language: Language, text: &str) -> Verdict {
    match language {
        Language::Arithmetic => arithmetic(text),
        Language::CsvRow => csv_row(text),
        Language::KeyValues => key_values(text),
        Language::SExpression => s_expression(text),
    }
}

/// `expr: term (("+"|"-") term)*`, `term: factor (("*"|"/") factor)*`,
/// `factor: INT | "(" expr ")" | "-" factor`, no whitespace.
fn arithmetic(text: &str) -> Verdict {
    #[derive(PartialEq)]
    enum S {
        Operand,
        Int,
        Closed,
    }
    let (mut s, mut depth) = (S::Operand, 0usize);
    for c in text.chars() {
        s = match (&s, c) {
            (S::Operand, '0'..='9') | (S::Int, '0'..='9') => S::Int,
            (S::Operand, '(') => {
                depth += 1;
                S::Operand
            }
            (S::Operand, '-') => S::Operand,
            (S::Int | S::Closed, '+' | '-' | '*' | '/') => S::Operand,
            (S::Int | S::Closed, ')') if depth > 0 => {
                depth -= 1;
                S::Closed
            }
            _ => return Verdict::Invalid(format!("unexpected {c:?}")),
        };
    }
    if s != S::Operand && depth == 0 {
        Verdict::Whole
    } else {
        Verdict::Prefix
    }
}

/// `field ("," field)*` where a field is `/[A-Za-z0-9 .-]{1,15}/` or a quoted one,
/// `/"([^"\n]|""){0,20}"/`.
fn csv_row(text: &str) -> Verdict {
    enum S {
        FieldStart,
        Bare(usize),
        /// Inside quotes, after this many units (a character or a doubled quote).
        Quoted(usize),
        /// A quote inside quotes: the closing one, or the first half of a doubled one.
        Quote(usize),
    }
    let bare = |c: char| c.is_ascii_alphanumeric() || matches!(c, ' ' | '.' | '-');
    let mut s = S::FieldStart;
    for c in text.chars() {
        s = match (s, c) {
            (S::FieldStart, '"') => S::Quoted(0),
            (S::FieldStart, c) if bare(c) => S::Bare(1),
            (S::Bare(n), c) if bare(c) && n < 15 => S::Bare(n + 1),
            (S::Bare(_), ',') | (S::Quote(_), ',') => S::FieldStart,
            (S::Quoted(n), '"') => S::Quote(n),
            (S::Quoted(n), c) if c != '\n' && n < 20 => S::Quoted(n + 1),
            (S::Quote(n), '"') if n < 20 => S::Quoted(n + 1),
            _ => return Verdict::Invalid(format!("unexpected {c:?}")),
        };
    }
    match s {
        S::Bare(_) | S::Quote(_) => Verdict::Whole,
        S::FieldStart | S::Quoted(_) => Verdict::Prefix,
    }
}

/// `pair (";" pair)*`, `pair: KEY "=" value` with `KEY: /[a-z][a-z0-9_]{0,11}/` and a value
/// `/-?[0-9]{1,6}/`, `true`, `false` or `/'[a-z ]{0,16}'/`.
fn key_values(text: &str) -> Verdict {
    enum S {
        KeyStart,
        Key(usize),
        ValueStart,
        Minus,
        Digits(usize),
        Word(&'static str),
        Str(usize),
        /// A value ended: `;` or the end.
        End,
    }
    let mut s = S::KeyStart;
    for c in text.chars() {
        s = match (s, c) {
            (S::KeyStart, 'a'..='z') => S::Key(1),
            (S::Key(n), 'a'..='z' | '0'..='9' | '_') if n < 12 => S::Key(n + 1),
            (S::Key(_), '=') => S::ValueStart,
            (S::ValueStart, '-') => S::Minus,
            (S::ValueStart | S::Minus, '0'..='9') => S::Digits(1),
            (S::Digits(n), '0'..='9') if n < 6 => S::Digits(n + 1),
            (S::ValueStart, 't') => S::Word("rue"),
            (S::ValueStart, 'f') => S::Word("alse"),
            (S::Word(rest), c) if rest.starts_with(c) => match &rest[c.len_utf8()..] {
                "" => S::End,
                rest => S::Word(rest),
            },
            (S::ValueStart, '\'') => S::Str(0),
            (S::Str(_), '\'') => S::End,
            (S::Str(n), 'a'..='z' | ' ') if n < 16 => S::Str(n + 1),
            (S::Digits(_) | S::End, ';') => S::KeyStart,
            _ => return Verdict::Invalid(format!("unexpected {c:?}")),
        };
    }
    match s {
        S::Digits(_) | S::End => Verdict::Whole,
        _ => Verdict::Prefix,
    }
}

/// `list: "(" item (" " item)* ")"`, `item: ATOM | list`, `ATOM: /[a-z]{1,8}/`.
fn s_expression(text: &str) -> Verdict {
    #[derive(PartialEq)]
    enum S {
        Start,
        /// After `(` or a space: an item.
        Item,
        Atom(usize),
        /// After `)`: a space or `)` inside a list, nothing at the top.
        Closed,
    }
    let (mut s, mut depth) = (S::Start, 0usize);
    for c in text.chars() {
        s = match (&s, c) {
            (S::Start | S::Item, '(') => {
                depth += 1;
                S::Item
            }
            (S::Item, 'a'..='z') => S::Atom(1),
            (S::Atom(n), 'a'..='z') if *n < 8 => S::Atom(n + 1),
            (S::Atom(_) | S::Closed, ' ') if depth > 0 => S::Item,
            (S::Atom(_) | S::Closed, ')') if depth > 0 => {
                depth -= 1;
                S::Closed
            }
            _ => return Verdict::Invalid(format!("unexpected {c:?}")),
        };
    }
    if s == S::Closed && depth == 0 {
        Verdict::Whole
    } else {
        Verdict::Prefix
    }
}

/// One completion as the stream told it.
struct Answer {
    ids: Vec<u32>,
    /// Every `Token` event's text, then the `Finished` one's.
    text: String,
    reason: FinishReason,
}

/// Submits one request per `(case, sampling, n)` at once (the engine batches them) and reads
/// every completion of each.
fn run(
    service: &Service,
    cases: &[Case],
    jobs: &[(usize, SamplingParams, usize)],
    max_tokens: usize,
) -> Vec<Vec<Answer>> {
    let streams: Vec<_> = jobs
        .iter()
        .map(|(case, sampling, n)| {
            let case = &cases[*case];
            let grammar = service
                .grammars
                .compile(&case.spec)
                .unwrap_or_else(|e| panic!("{} ({}): {e}", case.name, case.kind));
            submit(
                service,
                &case.prompt,
                sampling,
                *n,
                Some(grammar),
                max_tokens,
            )
        })
        .collect();
    streams
        .into_iter()
        .zip(jobs)
        .map(|(stream, (_, _, n))| read(stream, *n))
        .collect()
}

fn submit(
    service: &Service,
    prompt: &str,
    sampling: &SamplingParams,
    n: usize,
    grammar: Option<internvl_scheduler::Grammar>,
    max_tokens: usize,
) -> internvl_scheduler::RequestStream {
    let loaded = &service.loaded;
    let prompt = loaded
        .encode_prompt(&[ChatMessage::text(Role::User, prompt)])
        .unwrap();
    let generation = Generation {
        sampling: sampling.clone(),
        stop: StopParams {
            max_tokens,
            eos_token_id: Some(loaded.tokenizer.eos_id()),
            ..StopParams::default()
        },
        n,
        grammar,
    };
    service
        .engine
        .submit(request(loaded, &prompt, Vec::new(), generation))
        .unwrap()
}

/// The `n` completions of a stream, in index order.
fn read(mut stream: internvl_scheduler::RequestStream, n: usize) -> Vec<Answer> {
    let mut answers: Vec<Answer> = (0..n)
        .map(|_| Answer {
            ids: Vec::new(),
            text: String::new(),
            reason: FinishReason::Abort,
        })
        .collect();
    let mut finished = 0;
    while finished < n {
        match stream.next_blocking().expect("the stream ended early") {
            Event::Token {
                index, id, text, ..
            } => {
                answers[index].ids.push(id);
                answers[index].text.push_str(&text);
            }
            Event::Finished {
                index,
                text,
                reason,
                ..
            } => {
                answers[index].text.push_str(&text);
                answers[index].reason = reason;
                finished += 1;
            }
            Event::Error { message, .. } => panic!("a request failed: {message}"),
        }
    }
    answers
}

fn greedy() -> SamplingParams {
    SamplingParams::default()
}

fn sampled(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        seed: Some(seed),
        ..SamplingParams::default()
    }
}

/// Counts of a run, per kind of case.
#[derive(Default, Debug, Clone, Copy)]
struct Tally {
    answers: usize,
    stop: usize,
    length: usize,
}

/// Judges every answer of `cases`' runs; panics listing every invalid one. Returns the tally
/// per kind, in the corpus's order of kinds.
fn judge_all(
    service: &Service,
    cases: &[Case],
    jobs: &[(usize, SamplingParams, usize)],
    answers: &[Vec<Answer>],
    max_tokens: usize,
) -> Vec<(&'static str, Tally)> {
    let mut tallies: Vec<(&'static str, Tally)> = Vec::new();
    let mut failures = Vec::new();
    for ((case, sampling, _), completions) in jobs.iter().zip(answers) {
        let case = &cases[*case];
        if !tallies.iter().any(|(k, _)| *k == case.kind) {
            tallies.push((case.kind, Tally::default()));
        }
        let tally = &mut tallies.iter_mut().find(|(k, _)| *k == case.kind).unwrap().1;
        for (index, answer) in completions.iter().enumerate() {
            let whole = match answer.reason {
                FinishReason::Stop => {
                    tally.stop += 1;
                    true
                }
                FinishReason::Length => {
                    tally.length += 1;
                    assert_eq!(answer.ids.len(), max_tokens, "{}: cut early", case.name);
                    false
                }
                FinishReason::Abort => panic!("{}: aborted", case.name),
            };
            tally.answers += 1;
            // The text the client reads is the bytes of the tokens the grammar consumed.
            let bytes: Vec<u8> = answer
                .ids
                .iter()
                .flat_map(|&id| service.loaded.tokenizer.token_bytes(id).unwrap())
                .collect();
            let consumed = String::from_utf8_lossy(&bytes);
            let mut problem = None;
            if answer.text != consumed {
                problem = Some(format!(
                    "streamed text differs from the tokens' {consumed:?}"
                ));
            } else if let Err(why) = case.check.judge(&answer.text, whole) {
                problem = Some(why);
            }
            if let Some(why) = problem {
                failures.push(format!(
                    "{} ({}, temperature {}, seed {:?}, completion {index}, {:?}): {why}\n    {:?}",
                    case.name,
                    case.kind,
                    sampling.temperature,
                    sampling.seed,
                    answer.reason,
                    answer.text
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} invalid answers:\n{}",
        failures.len(),
        failures.join("\n")
    );
    tallies
}

fn summary(tallies: &[(&'static str, Tally)]) -> String {
    let total = tallies.iter().fold(Tally::default(), |t, (_, k)| Tally {
        answers: t.answers + k.answers,
        stop: t.stop + k.stop,
        length: t.length + k.length,
    });
    let kinds: Vec<String> = tallies
        .iter()
        .map(|(kind, t)| format!("{kind} {}/{} stop", t.stop, t.answers))
        .collect();
    format!(
        "{} answers, {} stop (all valid), {} cut by max_tokens (all valid prefixes); {}",
        total.answers,
        total.stop,
        total.length,
        kinds.join(", ")
    )
}

/// The share of answers that finished with stop, over all kinds.
fn stop_share(tallies: &[(&'static str, Tally)]) -> f64 {
    let (stop, answers) = tallies
        .iter()
        .fold((0, 0), |(s, a), (_, t)| (s + t.stop, a + t.answers));
    stop as f64 / answers as f64
}

#[test]
fn the_corpus_is_what_the_issue_asks() {
    let cases = corpus();
    let count = |kind: &str| cases.iter().filter(|c| c.kind == kind).count();
    assert!(count("json_schema") >= 50, "{}", count("json_schema"));
    assert!(count("regex") >= 5 && count("choice") >= 5 && count("lark") >= 3);
    // The schemas together use every feature the proof is about.
    let text: String = cases
        .iter()
        .filter_map(|c| match &c.spec {
            GrammarSpec::JsonSchema(s) => Some(s.to_string()),
            _ => None,
        })
        .collect();
    for keyword in [
        "\"minItems\"",
        "\"maxItems\"",
        "\"enum\"",
        "\"const\"",
        "\"anyOf\"",
        "\"oneOf\"",
        "\"$ref\":\"#/$defs/",
        "\"$ref\":\"#\"",
        "\"format\":\"date\"",
        "\"format\":\"date-time\"",
        "\"format\":\"email\"",
        "\"format\":\"uuid\"",
        "\"format\":\"ipv4\"",
        "\"minLength\"",
        "\"maxLength\"",
        "\"pattern\"",
        "\"minimum\"",
        "\"maximum\"",
        "\"exclusiveMinimum\"",
        "\"additionalProperties\":false",
    ] {
        assert!(text.contains(keyword), "no schema uses {keyword}");
    }
    // The recognizers accept their languages and refuse what is outside them.
    for (language, whole, prefix, invalid) in [
        (Language::Arithmetic, "(1+2)*-3", "(1+", "1+)"),
        (Language::CsvRow, "a b,\"x \"\"y\"\"\",3", "a,\"q", "a,,b"),
        (Language::KeyValues, "a=1;b_2=true;c='x y'", "k=fa", "k=1;;"),
        (Language::SExpression, "(a (b c) d)", "(a (b", "(a)(b)"),
    ] {
        assert_eq!(recognize(language, whole), Verdict::Whole, "{whole}");
        assert_eq!(recognize(language, prefix), Verdict::Prefix, "{prefix}");
        assert!(
            matches!(recognize(language, invalid), Verdict::Invalid(_)),
            "{invalid}"
        );
    }
    for (text, verdict) in [
        (r#"{"a": [1, -0.5e+3, "x\u00e9\n"], "b": {}}"#, "whole"),
        (r#"{"a": [1, -0.5e"#, "prefix"),
        (r#"{"a": tr"#, "prefix"),
        (r#"{"a": 01"#, "invalid"),
        (r#"{"a" 1"#, "invalid"),
        (r#"["x"]]"#, "invalid"),
        (r#"{"a": "\q"#, "invalid"),
    ] {
        let got = match json_prefix(text) {
            Verdict::Whole => "whole",
            Verdict::Prefix => "prefix",
            Verdict::Invalid(_) => "invalid",
        };
        assert_eq!(got, verdict, "{text}");
    }
}

#[test]
fn every_answer_over_the_corpus_is_valid_or_a_valid_prefix() {
    let service = service();
    let cases = corpus();
    let mut jobs = Vec::new();
    for case in 0..cases.len() {
        jobs.push((case, greedy(), 1));
        for seed in SEEDS {
            jobs.push((case, sampled(seed), 1));
        }
    }
    let answers = run(&service, &cases, &jobs, MAX_TOKENS);
    let tallies = judge_all(&service, &cases, &jobs, &answers, MAX_TOKENS);
    let share = stop_share(&tallies);
    eprintln!(
        "structured corpus: {} cases (greedy and 2 seeds at temperature 1, max_tokens {MAX_TOKENS}): {}",
        cases.len(),
        summary(&tallies)
    );
    // Measured: see docs/benchmarks.md. The bound keeps the proof from passing on answers
    // that are all cut short.
    assert!(
        share >= 0.7,
        "only {:.0}% finished with stop",
        share * 100.0
    );
}

#[test]
fn every_completion_of_n_follows_the_grammar() {
    let service = service();
    let cases = corpus();
    let jobs: Vec<_> = (0..cases.len())
        .map(|case| (case, sampled(99), 4))
        .collect();
    let answers = run(&service, &cases, &jobs, MAX_TOKENS);
    let tallies = judge_all(&service, &cases, &jobs, &answers, MAX_TOKENS);
    eprintln!(
        "structured corpus, n = 4 at temperature 1: {}",
        summary(&tallies)
    );
    // The four completions are sampled apart, not copies of one.
    let distinct = answers
        .iter()
        .filter(|c| c.iter().any(|a| a.ids != c[0].ids))
        .count();
    assert!(
        distinct * 2 > answers.len(),
        "{distinct} of {}",
        answers.len()
    );
    assert!(stop_share(&tallies) >= 0.7);
}

#[test]
fn constrained_and_free_requests_batched_give_their_solo_tokens() {
    const TOKENS: usize = 96;
    let service = service();
    let cases = corpus();
    let free = [
        "Describe the picture.",
        "这张图片里有什么？",
        "Write a haiku about the sea.",
        "List three colours.",
    ];
    // Every fourth case (all kinds), each followed by a free request.
    let requests: Vec<(&str, Option<&GrammarSpec>)> = (0..cases.len())
        .step_by(4)
        .enumerate()
        .flat_map(|(i, case)| {
            let case = &cases[case];
            [
                (case.prompt.as_str(), Some(&case.spec)),
                (free[i % free.len()], None),
            ]
        })
        .collect();
    let send = |(prompt, spec): &(&str, Option<&GrammarSpec>)| {
        let grammar = spec.map(|spec| service.grammars.compile(spec).unwrap());
        submit(&service, prompt, &greedy(), 1, grammar, TOKENS)
    };
    let ids = |stream| read(stream, 1).remove(0).ids;
    let steps = || service.engine.stats().steps;

    let before = steps();
    let alone: Vec<Vec<u32>> = requests.iter().map(|r| ids(send(r))).collect();
    let solo_steps = steps() - before;
    let before = steps();
    let streams: Vec<_> = requests.iter().map(send).collect();
    let together: Vec<Vec<u32>> = streams.into_iter().map(ids).collect();
    let batched_steps = steps() - before;

    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        let kind = requests[i].1.map_or("free", GrammarSpec::kind);
        assert_eq!(a, t, "request {i} ({kind}) batched differs from alone");
    }
    // They did share steps: batched, the engine took a fraction of the solo runs' steps.
    assert!(
        batched_steps * 4 < solo_steps,
        "{batched_steps} steps batched, {solo_steps} alone"
    );
    eprintln!(
        "structured corpus, mixed batch: {} requests ({} constrained), {solo_steps} steps alone, {batched_steps} together, tokens identical",
        requests.len(),
        requests.iter().filter(|r| r.1.is_some()).count()
    );
}
