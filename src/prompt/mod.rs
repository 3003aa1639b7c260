//! AUTOMATIC1111's prompt syntax, parsed exactly as AUTOMATIC1111 parses it: emphasis and
//! `BREAK` ([`attention`]), prompt editing and alternation ([`schedule`]).
pub mod attention;
pub mod schedule;

pub use attention::{parse_attention, Run};
pub use schedule::{schedule, Scheduled};
