//! Small helpers every stage uses.

pub mod raw_text;
