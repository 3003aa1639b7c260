//! `<lora:NAME:WEIGHT>` tags in prompts (AUTOMATIC1111's "extra networks"): found and taken out
//! of the text before it is encoded, as AUTOMATIC1111 does.
//!
//! AUTOMATIC1111 removes every `<word:args>` match of `<(\w+):([^>]+)>` from the prompt (and
//! only the match: the spaces and commas around it stay) and splits the arguments at `:`. For
//! `lora` (and its old alias `lyco`) the first argument is the name, the second the text
//! encoder's multiplier (default 1), the third the UNet's (default: the text encoder's);
//! `te=W` and `unet=W` name them. Other kinds (hypernetworks, ...) cannot be applied here, and
//! are an error rather than silently dropped.
use crate::{Error, Result, Setting};

/// One `<lora:...>` tag of a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTag {
    /// The LoRA's name: its file name without `.safetensors`.
    pub name: String,
    /// Multiplier of the text encoders' layers.
    pub text_weight: f64,
    /// Multiplier of the UNet's layers.
    pub unet_weight: f64,
}

/// A prompt with its tags taken out.
#[derive(Debug, Clone, PartialEq)]
pub struct Tagged {
    /// The text to encode.
    pub text: String,
    /// The tags, in the order they appear.
    pub tags: Vec<LoraTag>,
}

/// Python's `\w` for `str` patterns: letters, digits (any script) and `_`.
fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The length in bytes of a `<(\w+):([^>]+)>` match at the start of `s`, with its kind and
/// arguments.
fn match_at(s: &str) -> Option<(usize, &str, &str)> {
    let rest = s.strip_prefix('<')?;
    let kind_len = rest
        .char_indices()
        .find(|&(_, c)| !is_word(c))
        .map_or(rest.len(), |(i, _)| i);
    if kind_len == 0 {
        return None;
    }
    let kind = &rest[..kind_len];
    let args_and_more = rest[kind_len..].strip_prefix(':')?;
    let close = args_and_more.find('>')?;
    if close == 0 {
        return None;
    }
    let args = &args_and_more[..close];
    Some((1 + kind_len + 1 + close + 1, kind, args))
}

fn bad(setting: Setting, tag: &str, reason: impl Into<String>) -> Error {
    Error::setting(setting, tag, reason)
}

/// A multiplier as Python's `float()` reads it (surrounding spaces allowed); must be finite.
fn multiplier(setting: Setting, tag: &str, text: &str) -> Result<f64> {
    match text.trim().parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(bad(
            setting,
            tag,
            format!("`{text}` is not a number (write <lora:NAME:WEIGHT>)"),
        )),
    }
}

/// Reads one `lora` tag's arguments.
fn lora_tag(setting: Setting, tag: &str, args: &str) -> Result<LoraTag> {
    let mut positional = Vec::new();
    let mut named = Vec::new();
    for item in args.split(':') {
        // Python's `item.split('=', 2)`: exactly one `=` makes a named argument.
        let parts: Vec<&str> = item.splitn(3, '=').collect();
        match parts.as_slice() {
            [key, value] => named.push((*key, *value)),
            _ => positional.push(item),
        }
    }
    let name = args.split(':').next().unwrap_or("").trim().to_string();
    if name.is_empty() {
        return Err(bad(setting, tag, "the LoRA has no name"));
    }
    let mut text_weight = match positional.get(1) {
        Some(w) => multiplier(setting, tag, w)?,
        None => 1.0,
    };
    let mut unet_weight = None;
    if let Some(w) = positional.get(2) {
        unet_weight = Some(multiplier(setting, tag, w)?);
    }
    if positional.len() > 3 {
        return Err(bad(
            setting,
            tag,
            "too many arguments (a dynamic rank is not supported; write \
             <lora:NAME:WEIGHT> or <lora:NAME:TEXT_WEIGHT:UNET_WEIGHT>)",
        ));
    }
    for (key, value) in named {
        match key {
            "te" => text_weight = multiplier(setting, tag, value)?,
            "unet" => unet_weight = Some(multiplier(setting, tag, value)?),
            other => {
                return Err(bad(
                    setting,
                    tag,
                    format!("unknown argument `{other}` (te= and unet= are supported)"),
                ))
            }
        }
    }
    Ok(LoraTag {
        name,
        text_weight,
        unet_weight: unet_weight.unwrap_or(text_weight),
    })
}

/// Takes the `<lora:...>` tags out of `prompt` (the `setting` it comes from names it in
/// errors). A tag of another kind (`<hypernet:...>`) is an error.
pub fn extract(setting: Setting, prompt: &str) -> Result<Tagged> {
    if !prompt.contains('<') {
        return Ok(Tagged {
            text: prompt.to_string(),
            tags: Vec::new(),
        });
    }
    let mut text = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    let mut at = 0;
    while at < prompt.len() {
        let rest = &prompt[at..];
        if let Some((len, kind, args)) = match_at(rest) {
            let tag = &rest[..len];
            match kind {
                "lora" | "lyco" => tags.push(lora_tag(setting, tag, args)?),
                other => {
                    return Err(bad(
                        setting,
                        tag,
                        format!(
                            "`{other}` networks are not supported (only <lora:NAME:WEIGHT>); \
                             take the tag out of the prompt"
                        ),
                    ))
                }
            }
            at += len;
            continue;
        }
        let c = rest.chars().next().expect("non-empty rest");
        text.push(c);
        at += c.len_utf8();
    }
    Ok(Tagged { text, tags })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(p: &str) -> Tagged {
        extract(Setting::Prompt, p).unwrap()
    }

    #[test]
    fn tags_leave_the_text_around_them() {
        let t = tags("a cat, <lora:film_grain:0.8> in the rain <lora:x>");
        assert_eq!(t.text, "a cat,  in the rain ");
        assert_eq!(
            t.tags,
            [
                LoraTag {
                    name: "film_grain".into(),
                    text_weight: 0.8,
                    unet_weight: 0.8
                },
                LoraTag {
                    name: "x".into(),
                    text_weight: 1.0,
                    unet_weight: 1.0
                }
            ]
        );
        assert_eq!(tags("no tags (here:1.2)").text, "no tags (here:1.2)");
    }

    #[test]
    fn text_encoder_and_unet_multipliers() {
        let t = tags("<lora:a:0.5:0.25><lyco:b:unet=0.3:te=2>");
        assert_eq!(t.text, "");
        assert_eq!((t.tags[0].text_weight, t.tags[0].unet_weight), (0.5, 0.25));
        assert_eq!(t.tags[1].name, "b");
        assert_eq!((t.tags[1].text_weight, t.tags[1].unet_weight), (2.0, 0.3));
    }

    #[test]
    fn what_is_not_a_tag_stays_text() {
        for p in ["<lora>", "<:x>", "<lora:>", "a < b", "<lo ra:x>", "<lora:x"] {
            let t = tags(p);
            assert_eq!(t.text, p);
            assert!(t.tags.is_empty(), "{p}");
        }
        // Python's `[^>]+` takes anything up to the first `>`, another `<` included.
        let t = tags("<a<lora:x:1>");
        assert_eq!(t.text, "<a");
        assert_eq!(t.tags[0].name, "x");
        // Unicode word characters count as `\w`.
        assert_eq!(tags("é <lora:ねこ:1> é").tags[0].name, "ねこ");
    }

    #[test]
    fn bad_tags_are_errors_naming_them() {
        for (p, words) in [
            ("<lora:x:heavy>", "`heavy` is not a number"),
            ("<lora:x:inf>", "not a number"),
            ("<hypernet:x:1>", "`hypernet` networks are not supported"),
            ("<lora:x:1:1:8>", "too many arguments"),
            ("<lora:x:dyn=8>", "unknown argument `dyn`"),
            ("<lora: :1>", "no name"),
        ] {
            let e = extract(Setting::Prompt, p).unwrap_err().to_string();
            assert!(e.contains(words) && e.contains(p), "{p}: {e}");
        }
    }
}
