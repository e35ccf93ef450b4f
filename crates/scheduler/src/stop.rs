//! When a request is finished, and how much of its text may be sent so far.
//!
//! The engine feeds a request's [`StopChecker`] every generated token together with the text
//! the [`crate::Detokenizer`] produced for it. Stop strings may be split over several tokens
//! and must never reach the client, so the checker holds back any tail of the text that could
//! still grow into a stop string, and releases it as soon as it cannot (or when the request
//! finishes for another reason).

/// Most stop strings one request may give.
pub const MAX_STOP_STRINGS: usize = 16;

/// Longest stop string, in bytes. Matching costs, for every generated token, up to the square
/// of the longest stop string's length (see [`StopChecker::push`]): a 1 MB stop string would
/// make each token cost seconds on the engine's thread. Real stop strings are a few
/// characters (`"\n\nUser:"`, `"</s>"`); 256 bytes keeps the worst token under a million byte
/// comparisons for all of [`MAX_STOP_STRINGS`].
pub const MAX_STOP_STRING_BYTES: usize = 256;

/// Why a request finished: OpenAI's `finish_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token id or a stop string.
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// Cancelled by the engine (client gone, shutdown). [`StopChecker`] never returns it.
    Abort,
}

impl FinishReason {
    /// The name in the API's responses.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// What ended a request with [`FinishReason::Stop`]: vLLM's `stop_reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The model's end-of-sequence token.
    Eos,
    /// One of `stop_token_ids`.
    Token(u32),
    /// One of `stop_strings`, as given.
    String(String),
}

/// When one request stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopParams {
    /// Most tokens to generate, EOS and stop tokens included. At least 1. The default is
    /// unbounded: the engine must cap it by what fits in the model's context.
    pub max_tokens: usize,
    /// Before this many tokens have been generated, EOS, stop tokens and stop strings do not
    /// stop the request, and [`StopChecker::banned_tokens`] keeps the sampler from choosing EOS
    /// or the stop tokens. At most `max_tokens`.
    pub min_tokens: usize,
    /// Tokens that end the request; their text is not part of the output.
    pub stop_token_ids: Vec<u32>,
    /// Strings that end the request; neither they nor anything after them is output. At most
    /// [`MAX_STOP_STRINGS`], each non-empty and at most [`MAX_STOP_STRING_BYTES`] long.
    pub stop_strings: Vec<String>,
    /// Keep going through EOS (which is then an ordinary token, text and count).
    pub ignore_eos: bool,
    /// The model's end-of-sequence token, if it has one.
    pub eos_token_id: Option<u32>,
}

impl Default for StopParams {
    fn default() -> Self {
        Self {
            max_tokens: usize::MAX,
            min_tokens: 0,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            ignore_eos: false,
            eos_token_id: None,
        }
    }
}

impl StopParams {
    /// Checks the settings against a model whose logits have `vocab_size` entries: the one
    /// definition of what is valid, run when a request is submitted and by
    /// [`StopChecker::new`].
    pub fn validate(&self, vocab_size: usize) -> Result<(), StopError> {
        if self.max_tokens == 0 {
            return Err(StopError::MaxTokens);
        }
        if self.min_tokens > self.max_tokens {
            return Err(StopError::MinTokens {
                min_tokens: self.min_tokens,
                max_tokens: self.max_tokens,
            });
        }
        if self.stop_strings.len() > MAX_STOP_STRINGS {
            return Err(StopError::TooManyStopStrings(self.stop_strings.len()));
        }
        if self.stop_strings.iter().any(String::is_empty) {
            return Err(StopError::EmptyStopString);
        }
        if let Some(stop) = self
            .stop_strings
            .iter()
            .find(|s| s.len() > MAX_STOP_STRING_BYTES)
        {
            return Err(StopError::StopStringTooLong(stop.len()));
        }
        let eos = self.eos_token_id.filter(|_| !self.ignore_eos);
        if let Some(token) = self
            .stop_token_ids
            .iter()
            .copied()
            .chain(eos)
            .find(|&t| t as usize >= vocab_size)
        {
            return Err(StopError::TokenOutOfRange { token, vocab_size });
        }
        Ok(())
    }
}

/// Invalid stop settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StopError {
    #[error("max_tokens must be at least 1")]
    MaxTokens,
    #[error("min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})")]
    MinTokens {
        min_tokens: usize,
        max_tokens: usize,
    },
    #[error("stop strings must not be empty")]
    EmptyStopString,
    #[error("stop takes at most {MAX_STOP_STRINGS} strings, got {0}")]
    TooManyStopStrings(usize),
    #[error("a stop string may be at most {MAX_STOP_STRING_BYTES} bytes long, got {0}")]
    StopStringTooLong(usize),
    #[error("stop token {token} is outside the vocabulary of {vocab_size} tokens")]
    TokenOutOfRange { token: u32, vocab_size: usize },
}

impl StopError {
    /// The request field the error is about.
    pub fn param(&self) -> &'static str {
        match self {
            Self::MaxTokens => "max_tokens",
            Self::MinTokens { .. } => "min_tokens",
            Self::EmptyStopString | Self::TooManyStopStrings(_) | Self::StopStringTooLong(_) => {
                "stop"
            }
            Self::TokenOutOfRange { .. } => "stop_token_ids",
        }
    }
}

/// The outcome of one token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopStep {
    /// Text to send now; possibly empty, also when the request goes on.
    pub text: String,
    /// Set when this token finished the request: then `text` is the last of it.
    pub finish: Option<FinishReason>,
    /// What matched, when `finish` is [`FinishReason::Stop`].
    pub stop_reason: Option<StopReason>,
}

/// Decides, token by token, whether a request is done and what of its text may be sent.
#[derive(Debug, Clone)]
pub struct StopChecker {
    params: StopParams,
    /// The tokens that end the request: the stop token ids, and EOS unless ignored (vLLM's
    /// `all_stop_token_ids`). min_tokens bans exactly these.
    stop_ids: Vec<u32>,
    /// Tokens generated so far.
    generated: usize,
    /// Text received but not sent: a tail that could be the start of a stop string.
    held: String,
    /// The longest stop string, in bytes: how far back a match can start.
    longest_stop: usize,
}

impl StopChecker {
    /// A checker for a model whose logits have `vocab_size` entries (to reject impossible stop
    /// token ids up front).
    pub fn new(params: StopParams, vocab_size: usize) -> Result<Self, StopError> {
        params.validate(vocab_size)?;
        let eos = params.eos_token_id.filter(|_| !params.ignore_eos);
        let mut stop_ids: Vec<u32> = params.stop_token_ids.iter().copied().chain(eos).collect();
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let longest_stop = params
            .stop_strings
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(0);
        Ok(Self {
            params,
            stop_ids,
            generated: 0,
            held: String::new(),
            longest_stop,
        })
    }

    /// The tokens the sampler must not choose for the next token: EOS (unless ignored) and the
    /// stop token ids while fewer than `min_tokens` tokens have been generated (vLLM's
    /// min_tokens logits processor), else none. Pass it to [`crate::Sampler::sample`].
    pub fn banned_tokens(&self) -> &[u32] {
        if self.generated < self.params.min_tokens {
            &self.stop_ids
        } else {
            &[]
        }
    }

    /// Takes the next generated token and the text the detokenizer gave for it; says what to
    /// send and whether the request is finished. Not to be called again once it is.
    ///
    /// In order: EOS (unless `ignore_eos`) or a stop token id stops, dropping the token's own
    /// text; a stop string completed by this token's text stops, the output ending just before
    /// it; reaching `max_tokens` finishes with [`FinishReason::Length`]. The first two apply
    /// only to tokens after the first `min_tokens` (vLLM V1: a stop string completed by token
    /// number `min_tokens` or earlier is ignored). Finishing sends all held-back text that is
    /// not part of the matched stop string. When several stop strings complete in one token,
    /// the one that ends first wins (the earlier one starting first among those), as if
    /// text arrived character by character.
    pub fn push(&mut self, token: u32, text: &str) -> StopStep {
        self.generated += 1;
        let may_stop = self.generated > self.params.min_tokens;
        if may_stop {
            let reason = if Some(token) == self.params.eos_token_id && !self.params.ignore_eos {
                Some(StopReason::Eos)
            } else if self.params.stop_token_ids.contains(&token) {
                Some(StopReason::Token(token))
            } else {
                None
            };
            if let Some(reason) = reason {
                return self.finish(FinishReason::Stop, Some(reason));
            }
        }
        let old_len = self.held.len();
        self.held.push_str(text);
        if may_stop {
            if let Some((start, index)) = self.completed_stop(old_len) {
                self.held.truncate(start);
                let stop = self.params.stop_strings[index].clone();
                return self.finish(FinishReason::Stop, Some(StopReason::String(stop)));
            }
        }
        if self.generated >= self.params.max_tokens {
            return self.finish(FinishReason::Length, None);
        }
        let keep = self.partial_stop_start();
        let text = self.held[..keep].to_owned();
        self.held.drain(..keep);
        StopStep {
            text,
            finish: None,
            stop_reason: None,
        }
    }

    /// Ends the request with `step`'s token, as [`FinishReason::Stop`] with no stop reason:
    /// its output is complete (a grammar allows nothing more). The text held back because it
    /// might have begun a stop string is released.
    pub fn complete(&mut self, step: StopStep) -> StopStep {
        let mut text = step.text;
        text.push_str(&std::mem::take(&mut self.held));
        StopStep {
            text,
            finish: Some(FinishReason::Stop),
            stop_reason: None,
        }
    }

    fn finish(&mut self, reason: FinishReason, stop_reason: Option<StopReason>) -> StopStep {
        StopStep {
            text: std::mem::take(&mut self.held),
            finish: Some(reason),
            stop_reason,
        }
    }

    /// The stop string occurrence that ends first among those ending after byte `old_len` of
    /// the held text (that is, completed by the newest text), as (start, stop string index).
    fn completed_stop(&self, old_len: usize) -> Option<(usize, usize)> {
        let mut best: Option<(usize, usize, usize)> = None; // (end, start, index)
        for (index, stop) in self.params.stop_strings.iter().enumerate() {
            // An occurrence ending after old_len starts at old_len + 1 - stop.len() or later.
            let mut from =
                floor_char_boundary(&self.held, (old_len + 1).saturating_sub(stop.len()));
            while let Some(pos) = self.held[from..].find(stop.as_str()) {
                let start = from + pos;
                let end = start + stop.len();
                if end > old_len {
                    if best.is_none_or(|(e, s, _)| (end, start) < (e, s)) {
                        best = Some((end, start, index));
                    }
                    break;
                }
                from = start + self.held[start..].chars().next().map_or(1, char::len_utf8);
            }
        }
        best.map(|(_, start, index)| (start, index))
    }

    /// Where the longest tail of the held text that is a proper prefix of a stop string
    /// begins; the held text's length when there is none. Everything before it can be sent.
    fn partial_stop_start(&self) -> usize {
        let len = self.held.len();
        let mut start = floor_char_boundary(&self.held, len.saturating_sub(self.longest_stop));
        while start < len {
            let tail = &self.held[start..];
            if self
                .params
                .stop_strings
                .iter()
                .any(|stop| stop.len() > tail.len() && stop.starts_with(tail))
            {
                return start;
            }
            start += tail.chars().next().map_or(1, char::len_utf8);
        }
        len
    }
}

/// The largest char boundary of `text` at or before `index`.
fn floor_char_boundary(text: &str, mut index: usize) -> usize {
    while !text.is_char_boundary(index) {
        index -= 1;
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOS: u32 = 2;

    fn checker(params: StopParams) -> StopChecker {
        StopChecker::new(params, 100).unwrap()
    }

    fn with_stops(stops: &[&str]) -> StopParams {
        StopParams {
            stop_strings: stops.iter().map(|s| s.to_string()).collect(),
            eos_token_id: Some(EOS),
            ..Default::default()
        }
    }

    /// Feeds `(token, text)` pairs until the checker finishes; the text sent and the last step.
    fn run(checker: &mut StopChecker, tokens: &[(u32, &str)]) -> (Vec<String>, StopStep) {
        let mut sent = Vec::new();
        for (i, &(token, text)) in tokens.iter().enumerate() {
            let step = checker.push(token, text);
            sent.push(step.text.clone());
            if step.finish.is_some() {
                assert_eq!(i, tokens.len() - 1, "finished early");
                return (sent, step);
            }
        }
        let last = StopStep {
            text: String::new(),
            finish: None,
            stop_reason: None,
        };
        (sent, last)
    }

    #[test]
    fn stop_string_split_over_tokens_is_never_sent() {
        let mut c = checker(with_stops(&["###"]));
        let (sent, last) = run(&mut c, &[(10, "Hello #"), (11, "#"), (12, "# world")]);
        assert_eq!(sent, ["Hello ", "", ""]);
        assert_eq!(last.finish, Some(FinishReason::Stop));
        assert_eq!(last.stop_reason, Some(StopReason::String("###".into())));
    }

    #[test]
    fn text_around_a_stop_string_in_one_token() {
        let mut c = checker(with_stops(&["STOP"]));
        let (sent, last) = run(&mut c, &[(10, "fo"), (11, "o STOP bar")]);
        assert_eq!(sent.concat(), "foo ");
        assert_eq!(last.finish, Some(FinishReason::Stop));
    }

    #[test]
    fn held_text_is_released_once_it_cannot_be_a_stop_string() {
        let mut c = checker(with_stops(&["###", "ab"]));
        let (sent, last) = run(&mut c, &[(10, "x#"), (11, "#"), (12, "y a"), (13, "c")]);
        assert_eq!(sent, ["x", "", "##y ", "ac"]);
        assert_eq!(last.finish, None);
    }

    #[test]
    fn held_text_is_flushed_on_length_eos_and_stop_tokens() {
        let params = StopParams {
            max_tokens: 2,
            stop_token_ids: vec![7],
            ..with_stops(&["##"])
        };
        let (sent, last) = run(&mut checker(params.clone()), &[(10, "a"), (11, "b#")]);
        assert_eq!(sent, ["a", "b#"]);
        assert_eq!(last.finish, Some(FinishReason::Length));
        assert_eq!(last.stop_reason, None);

        let (sent, last) = run(&mut checker(params.clone()), &[(10, "a#"), (EOS, "</s>")]);
        assert_eq!(sent, ["a", "#"], "held text flushed, EOS text dropped");
        assert_eq!(last.stop_reason, Some(StopReason::Eos));

        let (sent, last) = run(&mut checker(params), &[(10, "a#"), (7, "seven")]);
        assert_eq!(
            sent,
            ["a", "#"],
            "held text flushed, stop token text dropped"
        );
        assert_eq!(last.finish, Some(FinishReason::Stop));
        assert_eq!(last.stop_reason, Some(StopReason::Token(7)));
    }

    #[test]
    fn the_stop_string_that_ends_first_wins() {
        let mut c = checker(with_stops(&["abcd", "bc"]));
        let (sent, last) = run(&mut c, &[(10, "xabcde")]);
        assert_eq!(sent, ["xa"]);
        assert_eq!(last.stop_reason, Some(StopReason::String("bc".into())));
        // Among those ending together, the one starting first.
        let mut c = checker(with_stops(&["c", "bc"]));
        let (sent, last) = run(&mut c, &[(10, "ab"), (11, "cd")]);
        assert_eq!(sent, ["a", ""]);
        assert_eq!(last.stop_reason, Some(StopReason::String("bc".into())));
    }

    #[test]
    fn overlapping_occurrences_are_found() {
        let mut c = checker(with_stops(&["aab"]));
        let (sent, last) = run(&mut c, &[(10, "a"), (11, "a"), (12, "ab")]);
        assert_eq!(sent.concat(), "a");
        assert_eq!(last.finish, Some(FinishReason::Stop));
    }

    #[test]
    fn multibyte_stop_strings_and_text() {
        let mut c = checker(with_stops(&["你好", "éa"]));
        let (sent, last) = run(&mut c, &[(10, "说你"), (11, "é"), (12, "好é"), (13, "a")]);
        assert_eq!(sent, ["说", "你", "é好", ""]);
        assert_eq!(last.stop_reason, Some(StopReason::String("éa".into())));
    }

    #[test]
    fn min_tokens_defers_every_stop_and_bans_eos_and_stop_tokens() {
        let params = StopParams {
            min_tokens: 2,
            stop_token_ids: vec![7, EOS],
            ..with_stops(&["##"])
        };
        let mut c = checker(params);
        assert_eq!(c.banned_tokens(), [EOS, 7]);
        // EOS as token 1 (had the sampler not banned it) is an ordinary token.
        let step = c.push(EOS, "");
        assert_eq!(step.finish, None);
        assert_eq!(c.banned_tokens(), [EOS, 7]);
        // A stop string completed by token 2 does not count either...
        let step = c.push(10, "##");
        assert_eq!((step.text.as_str(), step.finish), ("#", None));
        assert!(c.banned_tokens().is_empty());
        // ...but one completed by token 3 does, even if it began earlier.
        let step = c.push(11, "#x");
        assert_eq!(step.text, "");
        assert_eq!(step.stop_reason, Some(StopReason::String("##".into())));
    }

    #[test]
    fn ignore_eos_makes_eos_an_ordinary_counted_token() {
        let params = StopParams {
            max_tokens: 3,
            min_tokens: 1,
            ignore_eos: true,
            ..with_stops(&[])
        };
        let mut c = checker(params);
        assert!(
            c.banned_tokens().is_empty(),
            "EOS is not banned when ignored"
        );
        let (sent, last) = run(&mut c, &[(EOS, ""), (10, "a"), (EOS, "")]);
        assert_eq!(sent.concat(), "a");
        assert_eq!(last.finish, Some(FinishReason::Length));
    }

    #[test]
    fn rejects_bad_settings() {
        let bad = |params: StopParams, error: StopError| {
            assert_eq!(StopChecker::new(params, 100).unwrap_err(), error);
        };
        bad(
            StopParams {
                max_tokens: 0,
                ..Default::default()
            },
            StopError::MaxTokens,
        );
        bad(
            StopParams {
                max_tokens: 3,
                min_tokens: 4,
                ..Default::default()
            },
            StopError::MinTokens {
                min_tokens: 4,
                max_tokens: 3,
            },
        );
        bad(with_stops(&["a", ""]), StopError::EmptyStopString);
        let many: Vec<String> = (0..=MAX_STOP_STRINGS).map(|i| i.to_string()).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        bad(
            with_stops(&many),
            StopError::TooManyStopStrings(MAX_STOP_STRINGS + 1),
        );
        assert!(StopChecker::new(with_stops(&many[1..]), 100).is_ok());
        let long = "x".repeat(MAX_STOP_STRING_BYTES + 1);
        bad(
            with_stops(&[long.as_str()]),
            StopError::StopStringTooLong(MAX_STOP_STRING_BYTES + 1),
        );
        assert!(StopChecker::new(with_stops(&[&long[1..]]), 100).is_ok());
        bad(
            StopParams {
                stop_token_ids: vec![100],
                ..Default::default()
            },
            StopError::TokenOutOfRange {
                token: 100,
                vocab_size: 100,
            },
        );
        assert_eq!(FinishReason::Length.as_str(), "length");
    }
}
