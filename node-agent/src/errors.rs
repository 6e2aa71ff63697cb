//! How node errors are written out for operators: a message with its causes.

/// `err: cause: cause's cause`, the form operators read in logs and tool errors.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
