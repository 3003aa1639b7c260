//! AUTOMATIC1111's emphasis syntax: a prompt split into runs of text, each with the weight its
//! brackets give it, and `BREAK` markers. Matches `parse_prompt_attention` in AUTOMATIC1111's
//! `modules/prompt_parser.py` run for run and weight for weight (the weights are multiplied in
//! the same order, in f64, so equal runs merge exactly where Python's floats do).
//!
//! - `(text)` multiplies by 1.1, `[text]` by 1/1.1 (a multiplication by the rounded reciprocal,
//!   as AUTOMATIC1111 does, not a division), `(text:1.3)` by 1.3; brackets nest.
//! - `\(`, `\)`, `\[`, `\]` and `\\` are literal; a lone `\` vanishes.
//! - Unclosed brackets apply to the end of the prompt; a closing bracket without its opening
//!   one is literal text.
//! - `BREAK` (as a whole word, with the whitespace around it) ends a 75-token chunk. It is
//!   recorded as a run with weight -1 that brackets multiply like any other; only a run that
//!   is still exactly ("BREAK", -1) acts as a break later, so `(a BREAK b)` keeps the word.

/// One run of a prompt and its weight. A break is the run ("BREAK", -1.0).
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub text: String,
    pub weight: f64,
}

impl Run {
    /// A run of `text` at `weight`.
    pub fn new(text: impl Into<String>, weight: f64) -> Self {
        Self {
            text: text.into(),
            weight,
        }
    }

    /// True for the marker that ends a chunk.
    pub fn is_break(&self) -> bool {
        self.text == BREAK && self.weight == -1.0
    }
}

const BREAK: &str = "BREAK";
const ROUND: f64 = 1.1;

/// A token of the emphasis syntax (the alternatives of AUTOMATIC1111's `re_attention`, in its
/// order of preference).
#[derive(Debug, PartialEq)]
enum Token<'a> {
    /// `\(`, `\)`, `\[`, `\]`, `\\` or a lone `\`: the text after the backslash.
    Escaped(&'a str),
    Open(char),
    /// `:1.3)` or `: 1.3 )`: the whole match and the weight's text.
    WeightClose(&'a str, &'a str),
    Close(char),
    /// A run without brackets, backslashes or colons; or a lone `:`.
    Text(&'a str),
}

fn tokens(text: &str) -> Vec<Token<'_>> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let (token, len) = match c {
            '\\' => match rest[1..].chars().next() {
                Some(n @ ('(' | ')' | '[' | ']' | '\\')) => {
                    (Token::Escaped(&rest[1..2]), 1 + n.len_utf8())
                }
                _ => (Token::Escaped(""), 1),
            },
            '(' | '[' => (Token::Open(c), 1),
            ')' | ']' => (Token::Close(c), 1),
            ':' => {
                // `:\s*([+-]?[.\d]+)\s*\)`
                let skip_space = |from: usize| {
                    rest[from..]
                        .find(|c: char| !c.is_whitespace())
                        .map_or(rest.len(), |i| from + i)
                };
                let start = skip_space(1);
                let body = &rest[start..];
                let sign = usize::from(body.starts_with(['+', '-']));
                let digits = body[sign..]
                    .find(|c: char| !(c == '.' || c.is_ascii_digit()))
                    .unwrap_or(body.len() - sign);
                let end = start + sign + digits;
                let close = skip_space(end);
                if digits > 0 && rest[close..].starts_with(')') {
                    (
                        Token::WeightClose(&rest[..close + 1], &rest[start..end]),
                        close + 1,
                    )
                } else {
                    (Token::Text(":"), 1)
                }
            }
            _ => {
                let end = rest
                    .find(['\\', '(', ')', '[', ']', ':'])
                    .unwrap_or(rest.len());
                (Token::Text(&rest[..end]), end)
            }
        };
        out.push(token);
        rest = &rest[len..];
    }
    out
}

/// Python's `\w` for one character: letters, digits and the underscore.
fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `re.split(r"\s*\bBREAK\b\s*", text)`: the parts between whole-word `BREAK`s, each taking the
/// whitespace around it.
fn split_breaks(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut search = 0;
    while let Some(found) = text[search..].find(BREAK) {
        let at = search + found;
        let end = at + BREAK.len();
        let before_ok = text[..at].chars().next_back().is_none_or(|c| !is_word(c));
        let after_ok = text[end..].chars().next().is_none_or(|c| !is_word(c));
        if !(before_ok && after_ok) {
            search = at + 1;
            continue;
        }
        // The match starts at the whitespace run before the word (never before the last
        // match's end) and takes the whitespace after it.
        let lead = text[start..at]
            .char_indices()
            .rev()
            .take_while(|(_, c)| c.is_whitespace())
            .last()
            .map_or(at, |(i, _)| start + i);
        let trail = text[end..]
            .char_indices()
            .find(|(_, c)| !c.is_whitespace())
            .map_or(text.len(), |(i, _)| end + i);
        parts.push(&text[start..lead]);
        start = trail;
        search = trail.max(end);
    }
    parts.push(&text[start..]);
    parts
}

/// Splits `text` into weighted runs, as AUTOMATIC1111's `parse_prompt_attention`. A weight
/// that is not a number (`(a:1.2.3)`, where AUTOMATIC1111's `float()` raises) is an error
/// naming it.
pub fn parse_attention(text: &str) -> Result<Vec<Run>, String> {
    let mut res: Vec<Run> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let square_multiplier = 1.0 / ROUND;
    fn multiply(res: &mut [Run], from: usize, by: f64) {
        for run in &mut res[from..] {
            run.weight *= by;
        }
    }
    for token in tokens(text) {
        match token {
            Token::Escaped(t) => res.push(Run::new(t, 1.0)),
            Token::Open('(') => round.push(res.len()),
            Token::Open(_) => square.push(res.len()),
            Token::WeightClose(_, w) if !round.is_empty() => {
                let weight: f64 = w
                    .parse()
                    .map_err(|_| format!("emphasis weight `{w}` is not a number"))?;
                let from = round.pop().unwrap_or(0);
                multiply(&mut res, from, weight);
            }
            Token::Close(')') if !round.is_empty() => {
                let from = round.pop().unwrap_or(0);
                multiply(&mut res, from, ROUND);
            }
            Token::Close(']') if !square.is_empty() => {
                let from = square.pop().unwrap_or(0);
                multiply(&mut res, from, square_multiplier);
            }
            other => {
                let literal = match other {
                    Token::Text(t) => t.to_string(),
                    Token::WeightClose(whole, _) => whole.to_string(),
                    Token::Close(c) | Token::Open(c) => c.to_string(),
                    Token::Escaped(t) => t.to_string(),
                };
                for (i, part) in split_breaks(&literal).into_iter().enumerate() {
                    if i > 0 {
                        res.push(Run::new(BREAK, -1.0));
                    }
                    res.push(Run::new(part, 1.0));
                }
            }
        }
    }
    for from in round {
        multiply(&mut res, from, ROUND);
    }
    for from in square {
        multiply(&mut res, from, square_multiplier);
    }
    if res.is_empty() {
        res.push(Run::new("", 1.0));
    }
    // Neighbouring runs of the same weight merge (breaks included, as in AUTOMATIC1111).
    let mut merged: Vec<Run> = Vec::with_capacity(res.len());
    for run in res {
        match merged.last_mut() {
            Some(last) if last.weight == run.weight => last.text.push_str(&run.text),
            _ => merged.push(run),
        }
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(text: &str) -> Vec<(String, f64)> {
        parse_attention(text)
            .unwrap()
            .into_iter()
            .map(|r| (r.text, r.weight))
            .collect()
    }

    fn r(pairs: &[(&str, f64)]) -> Vec<(String, f64)> {
        pairs.iter().map(|(t, w)| (t.to_string(), *w)).collect()
    }

    // The examples of AUTOMATIC1111's docstring, weights as Python prints them.
    #[test]
    fn docstring_examples() {
        assert_eq!(runs("normal text"), r(&[("normal text", 1.0)]));
        assert_eq!(
            runs("an (important) word"),
            r(&[("an ", 1.0), ("important", 1.1), (" word", 1.0)])
        );
        assert_eq!(runs("(unbalanced"), r(&[("unbalanced", 1.1)]));
        assert_eq!(runs("\\(literal\\]"), r(&[("(literal]", 1.0)]));
        assert_eq!(
            runs("(unnecessary)(parens)"),
            r(&[("unnecessaryparens", 1.1)])
        );
        assert_eq!(
            runs("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            r(&[
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ])
        );
    }

    #[test]
    fn breaks_take_their_whitespace_and_brackets_disarm_them() {
        assert_eq!(
            runs("(a BREAK b) BREAK c"),
            r(&[
                ("a", 1.1),
                ("BREAK", -1.1),
                ("b", 1.1),
                ("", 1.0),
                ("BREAK", -1.0),
                ("c", 1.0)
            ])
        );
        assert_eq!(runs("BREAKfast"), r(&[("BREAKfast", 1.0)]));
        assert!(parse_attention("a BREAK b").unwrap()[1].is_break());
    }

    #[test]
    fn bad_weight_is_an_error() {
        assert!(parse_attention("(a:1.2.3)").is_err());
        assert_eq!(runs("a:1.2)"), r(&[("a:1.2)", 1.0)]));
    }
}
