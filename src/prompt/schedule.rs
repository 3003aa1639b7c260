//! AUTOMATIC1111's prompt editing and alternation: `[from:to:when]` switches text at a step,
//! `[a|b]` alternates text every step. A prompt becomes a schedule, a list of (last step,
//! text) pairs, as `get_learned_conditioning_prompt_schedules` in AUTOMATIC1111's
//! `modules/prompt_parser.py` makes it from its lark grammar:
//!
//! ```text
//! start:       (prompt | any of "[]():" as literal text)*
//! prompt:      (emphasized | scheduled | alternate | plain | whitespace)*
//! emphasized:  "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"   (kept as text)
//! scheduled:   "[" [prompt ":"] prompt ":" [whitespace] NUMBER [whitespace] "]"
//! alternate:   "[" prompt ("|" [prompt])+ "]"
//! plain:       characters other than \ [ ] ( ) : |, or a backslash and any character
//! ```
//!
//! A bracket group is structured when it parses as one of the three (its separators at depth
//! zero decide which); otherwise its bracket is literal text at the top level, and a prompt
//! that does not parse at all (a `|` outside an alternation, a trailing backslash) is one
//! schedule entry holding the whole prompt, as in AUTOMATIC1111.
//!
//! `when` written with a decimal point is a fraction of the steps (`0.5` of 20 is 10, `1.0` is
//! all 20), without one a step number (`1e1` is 10); the step is truncated toward zero and
//! capped at the step count (AUTOMATIC1111's `min(steps, int(when))`), and only a switch at
//! step 1 or later becomes a schedule entry. Text before the switch is used while
//! `step <= when`. An alternation adds every step 1..=steps to the schedule; an empty option
//! is empty text. (This is AUTOMATIC1111's current scheduling, not the `use_old_scheduling`
//! compatibility option, and without hires fix.)

/// A parsed prompt: text, and the structured groups inside it.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    Text(String),
    Scheduled {
        before: Vec<Node>,
        after: Vec<Node>,
        /// The number as written.
        when: String,
    },
    Alternate(Vec<Vec<Node>>),
}

/// Byte-level cursor over the prompt.
struct Parser<'a> {
    s: &'a str,
}

impl<'a> Parser<'a> {
    fn peek(&self, pos: usize) -> Option<char> {
        self.s[pos..].chars().next()
    }

    /// `plain | whitespace`: a maximal run of characters that are not special, escapes
    /// included. Returns the end, or `pos` when nothing matched.
    fn plain(&self, pos: usize) -> usize {
        let mut p = pos;
        while let Some(c) = self.peek(p) {
            match c {
                '[' | ']' | '(' | ')' | ':' | '|' => break,
                '\\' => match self.peek(p + 1) {
                    // `\\.`: any character but a newline.
                    Some(n) if n != '\n' => p += 1 + n.len_utf8(),
                    _ => break,
                },
                _ => p += c.len_utf8(),
            }
        }
        p
    }

    /// `prompt`: items until a character that cannot start one. Returns the nodes and the end.
    fn prompt(&self, pos: usize) -> (Vec<Node>, usize) {
        let mut nodes = Vec::new();
        let mut p = pos;
        loop {
            let end = self.plain(p);
            if end > p {
                nodes.push(Node::Text(self.s[p..end].to_string()));
                p = end;
                continue;
            }
            match self.group(p) {
                Some((mut group, end)) => {
                    nodes.append(&mut group);
                    p = end;
                }
                None => return (nodes, p),
            }
        }
    }

    /// A structured bracket group at `pos` (emphasized, scheduled or alternate), as nodes.
    fn group(&self, pos: usize) -> Option<(Vec<Node>, usize)> {
        match self.peek(pos)? {
            '(' => {
                let (first, p) = self.prompt(pos + 1);
                let mut nodes = vec![Node::Text("(".into())];
                nodes.extend(first);
                match self.peek(p)? {
                    ')' => {
                        nodes.push(Node::Text(")".into()));
                        Some((nodes, p + 1))
                    }
                    ':' => {
                        let (second, q) = self.prompt(p + 1);
                        (self.peek(q)? == ')').then_some(())?;
                        nodes.push(Node::Text(":".into()));
                        nodes.extend(second);
                        nodes.push(Node::Text(")".into()));
                        Some((nodes, q + 1))
                    }
                    _ => None,
                }
            }
            '[' => {
                let (first, p) = self.prompt(pos + 1);
                match self.peek(p)? {
                    ']' => {
                        let mut nodes = vec![Node::Text("[".into())];
                        nodes.extend(first);
                        nodes.push(Node::Text("]".into()));
                        Some((nodes, p + 1))
                    }
                    '|' => {
                        let mut options = vec![first];
                        let mut q = p;
                        while self.peek(q) == Some('|') {
                            let (next, r) = self.prompt(q + 1);
                            options.push(next);
                            q = r;
                        }
                        (self.peek(q)? == ']').then_some(())?;
                        Some((vec![Node::Alternate(options)], q + 1))
                    }
                    ':' => {
                        // [before:after:when] when the text after the colon is a prompt
                        // followed by a colon; else [after:when].
                        let (second, q) = self.prompt(p + 1);
                        if self.peek(q) == Some(':') {
                            if let Some((when, end)) = self.number_close(q + 1) {
                                let node = Node::Scheduled {
                                    before: first,
                                    after: second,
                                    when,
                                };
                                return Some((vec![node], end));
                            }
                        }
                        let (when, end) = self.number_close(p + 1)?;
                        let node = Node::Scheduled {
                            before: Vec::new(),
                            after: first,
                            when,
                        };
                        Some((vec![node], end))
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// The end of the whitespace run at `pos`.
    fn whitespace(&self, mut p: usize) -> usize {
        while let Some(c) = self.peek(p).filter(|c| c.is_whitespace()) {
            p += c.len_utf8();
        }
        p
    }

    /// `[whitespace] NUMBER [whitespace] "]"` at `pos`: lark's SIGNED_NUMBER (`[+-]`, then
    /// digits with an optional fraction, or a fraction alone, then an optional exponent).
    fn number_close(&self, pos: usize) -> Option<(String, usize)> {
        let b = self.s.as_bytes();
        let mut p = self.whitespace(pos);
        let start = p;
        if matches!(b.get(p), Some(b'+' | b'-')) {
            p += 1;
        }
        let digits = |p: &mut usize| {
            let from = *p;
            while b.get(*p).is_some_and(u8::is_ascii_digit) {
                *p += 1;
            }
            *p > from
        };
        let int = digits(&mut p);
        let mut frac = false;
        if b.get(p) == Some(&b'.') {
            let mut q = p + 1;
            frac = digits(&mut q);
            // "1." is a number, "." is not.
            if int || frac {
                p = q;
            }
        }
        if !int && !frac {
            return None;
        }
        if matches!(b.get(p), Some(b'e' | b'E')) {
            let mut q = p + 1;
            if matches!(b.get(q), Some(b'+' | b'-')) {
                q += 1;
            }
            if digits(&mut q) {
                p = q;
            }
        }
        let number = self.s[start..p].to_string();
        let p = self.whitespace(p);
        if b.get(p) != Some(&b']') {
            return None;
        }
        Some((number, p + 1))
    }

    /// `start`: items, or one of `[]():` as literal text; `None` when the prompt does not parse.
    fn start(&self) -> Option<Vec<Node>> {
        let mut nodes = Vec::new();
        let mut p = 0;
        while p < self.s.len() {
            let (mut items, end) = self.prompt(p);
            if end > p {
                nodes.append(&mut items);
                p = end;
                continue;
            }
            match self.peek(p)? {
                c @ ('[' | ']' | '(' | ')' | ':') => {
                    nodes.push(Node::Text(c.to_string()));
                    p += 1;
                }
                _ => return None,
            }
        }
        Some(nodes)
    }
}

/// One entry of a schedule: `text` is used up to and including step `until`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheduled {
    pub until: i64,
    pub text: String,
}

/// The step a `when` switches at: with a decimal point a fraction of `steps`, else a step;
/// truncated toward zero, at most `steps` (an infinite number, where Python would raise, is
/// `steps`).
fn switch_step(when: &str, steps: i64) -> i64 {
    let value: f64 = when.parse().unwrap_or(f64::NAN);
    let w = if when.contains('.') {
        value * steps as f64
    } else {
        value
    };
    if w.is_nan() {
        return steps;
    }
    // `as` saturates: huge values become i64::MAX before the cap.
    (w.trunc() as i64).min(steps)
}

fn collect_steps(nodes: &[Node], steps: i64, out: &mut Vec<i64>) {
    for node in nodes {
        match node {
            Node::Text(_) => {}
            Node::Scheduled {
                before,
                after,
                when,
            } => {
                collect_steps(before, steps, out);
                collect_steps(after, steps, out);
                let at = switch_step(when, steps);
                if at >= 1 {
                    out.push(at);
                }
            }
            Node::Alternate(options) => {
                for o in options {
                    collect_steps(o, steps, out);
                }
                out.extend(1..=steps);
            }
        }
    }
}

fn text_at(nodes: &[Node], step: i64, steps: i64, out: &mut String) {
    for node in nodes {
        match node {
            Node::Text(t) => out.push_str(t),
            Node::Scheduled {
                before,
                after,
                when,
            } => {
                let chosen = if step <= switch_step(when, steps) {
                    before
                } else {
                    after
                };
                text_at(chosen, step, steps, out);
            }
            Node::Alternate(options) => {
                let n = options.len() as i64;
                let index = (step - 1).rem_euclid(n) as usize;
                text_at(&options[index], step, steps, out);
            }
        }
    }
}

/// The schedule of `prompt` over `steps` sampling steps, in step order; a prompt without
/// editing or alternation gives one entry, `(steps, prompt)`.
pub fn schedule(prompt: &str, steps: usize) -> Vec<Scheduled> {
    let steps = steps as i64;
    let whole = || {
        vec![Scheduled {
            until: steps,
            text: prompt.to_string(),
        }]
    };
    let Some(nodes) = (Parser { s: prompt }).start() else {
        return whole();
    };
    let mut at = vec![steps];
    collect_steps(&nodes, steps, &mut at);
    at.sort_unstable();
    at.dedup();
    at.into_iter()
        .map(|until| {
            let mut text = String::new();
            text_at(&nodes, until, steps, &mut text);
            Scheduled { until, text }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(prompt: &str) -> Vec<(i64, String)> {
        schedule(prompt, 10)
            .into_iter()
            .map(|s| (s.until, s.text))
            .collect()
    }

    fn s(pairs: &[(i64, &str)]) -> Vec<(i64, String)> {
        pairs.iter().map(|(u, t)| (*u, t.to_string())).collect()
    }

    // AUTOMATIC1111's docstring examples, with the outputs its code gives today.
    #[test]
    fn docstring_examples() {
        assert_eq!(g("test"), s(&[(10, "test")]));
        assert_eq!(g("a [b:3]"), s(&[(3, "a "), (10, "a b")]));
        assert_eq!(g("a [b: 3]"), s(&[(3, "a "), (10, "a b")]));
        assert_eq!(g("a [[[b]]:2]"), s(&[(2, "a "), (10, "a [[b]]")]));
        assert_eq!(g("[(a:2):3]"), s(&[(3, ""), (10, "(a:2)")]));
        assert_eq!(g("a [b : c : 1] d"), s(&[(1, "a b  d"), (10, "a  c  d")]));
        assert_eq!(
            g("a[b:[c:d:2]:1]e"),
            s(&[(1, "abe"), (2, "ace"), (10, "ade")])
        );
        assert_eq!(g("a [unbalanced"), s(&[(10, "a [unbalanced")]));
        assert_eq!(g("a [b:.5] c"), s(&[(5, "a  c"), (10, "a b c")]));
        assert_eq!(g("a [{b|d{:.5] c"), s(&[(10, "a [{b|d{:.5] c")]));
        assert_eq!(
            g("((a][:b:c [d:3]"),
            s(&[(3, "((a][:b:c "), (10, "((a][:b:c d")])
        );
        let alt: Vec<(i64, String)> = (1..=10)
            .map(|i| (i, if i % 2 == 1 { "a" } else { "(b:1.1)" }.to_string()))
            .collect();
        assert_eq!(g("[a|(b:1.1)]"), alt);
    }

    #[test]
    fn edge_cases_as_automatic1111_runs_them() {
        assert_eq!(g("[a:b]"), s(&[(10, "[a:b]")]));
        assert_eq!(g("a|b"), s(&[(10, "a|b")]));
        assert_eq!(g("[a:-1]"), s(&[(10, "a")]));
        assert_eq!(g("x [a:1e1] y"), s(&[(10, "x  y")]));
        assert_eq!(g("[a:b:0]"), s(&[(10, "b")]));
        assert_eq!(g("[:b:2]"), s(&[(2, ""), (10, "b")]));
        assert_eq!(g("[ [a:2] ]"), s(&[(2, "[  ]"), (10, "[ a ]")]));
        // A decimal point makes a fraction, even 1.0; whitespace may close the number.
        assert_eq!(g("a [b:1.0] c"), s(&[(10, "a  c")]));
        assert_eq!(g("[a:b: 3 ]"), s(&[(3, "a"), (10, "b")]));
        // Empty alternatives are empty text.
        let alt: Vec<(i64, String)> = (1..=10)
            .map(|i| (i, ["a", "", "b"][(i as usize - 1) % 3].to_string()))
            .collect();
        assert_eq!(g("[a||b]"), alt);
    }
}
