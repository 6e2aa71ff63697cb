//! `moat-guest`: the agent inside each VM. This first piece is the control
//! channel (vsock port 100 in a guest): a versioned hello, so the host can
//! tell which agent and image it is talking to, and pings for liveness.
//! Files, exec and PTY arrive with the guest-agent issue.

mod control;

use std::path::PathBuf;

const USAGE: &str = "usage: moat-guest serve --listen unix:PATH [--image-info FILE]\n       moat-guest --version";

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match parse(&args) {
        Ok(Command::Version) => {
            println!("moat-guest {} (control protocol {})", control::AGENT_VERSION, control::PROTOCOL)
        }
        Ok(Command::Serve { socket, image_info }) => {
            if let Err(e) = control::serve_unix(&socket, image_info.as_deref()).await {
                eprintln!("moat-guest: {e}");
                std::process::exit(1);
            }
        }
        Err(message) => {
            eprintln!("moat-guest: {message}\n{USAGE}");
            std::process::exit(2);
        }
    }
}

#[derive(Debug, PartialEq)]
enum Command {
    Version,
    Serve { socket: PathBuf, image_info: Option<PathBuf> },
}

fn parse(args: &[String]) -> Result<Command, String> {
    match args.first().map(String::as_str) {
        Some("--version" | "-V") => Ok(Command::Version),
        Some("serve") => {
            let mut socket = None;
            let mut image_info = None;
            let mut rest = args[1..].iter();
            while let Some(flag) = rest.next() {
                let value = rest.next().ok_or_else(|| format!("{flag} needs a value"))?;
                match flag.as_str() {
                    "--listen" => {
                        let path = value.strip_prefix("unix:").ok_or_else(|| {
                            format!("--listen {value}: only unix:PATH is supported yet (vsock arrives with exec/files)")
                        })?;
                        socket = Some(PathBuf::from(path));
                    }
                    "--image-info" => image_info = Some(PathBuf::from(value)),
                    other => return Err(format!("unknown flag {other}")),
                }
            }
            Ok(Command::Serve { socket: socket.ok_or("serve needs --listen unix:PATH")?, image_info })
        }
        Some(other) => Err(format!("unknown command {other}")),
        None => Err("no command".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(parse(&s(&["--version"])), Ok(Command::Version));
        assert_eq!(
            parse(&s(&["serve", "--listen", "unix:/run/g.sock"])),
            Ok(Command::Serve { socket: "/run/g.sock".into(), image_info: None })
        );
        assert!(parse(&s(&["serve", "--listen", "vsock:100"])).unwrap_err().contains("only unix:PATH"));
        assert!(parse(&s(&["serve"])).unwrap_err().contains("--listen"));
        assert!(parse(&s(&["serve", "--listen"])).unwrap_err().contains("needs a value"));
        assert!(parse(&s(&[])).is_err());
    }
}
