//! `moat-guest`: the agent inside each VM. It serves two channels, normally on
//! vsock: the control channel (port 100: a versioned hello with the image's
//! metadata, and pings for liveness) and an MCP server (port 200) with file and
//! process tools. Either can listen on a Unix socket instead, for tests on the
//! host and hosts without vsock.
//!
//! `moat-guest mcp` is the other direction: a stdio MCP endpoint for a client
//! inside a portal VM, relayed to moat over the host's vsock.

use std::path::PathBuf;
use std::sync::Arc;

use moat_guest::listen::{ListenAddr, Listener};
use moat_guest::uplink::{self, Uplink};
use moat_guest::{control, exec, mcp};
use rmcp::ServiceExt;

const USAGE: &str =
    "usage: moat-guest serve [--control vsock:100|unix:PATH] [--mcp vsock:200|unix:PATH] [--image-info FILE]
       moat-guest mcp [--uplink vsock|unix:PATH]   (stdio MCP to moat, from a portal VM)
       moat-guest --version";

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match parse(&args) {
        Ok(Command::Version) => {
            println!("moat-guest {} (control protocol {})", control::AGENT_VERSION, control::PROTOCOL)
        }
        Ok(Command::Serve { control, mcp, image_info }) => {
            if let Err(e) = serve(control, mcp, image_info).await {
                eprintln!("moat-guest: {e}");
                std::process::exit(1);
            }
        }
        Ok(Command::Mcp { uplink }) => {
            // stdout is the MCP channel: only JSON-RPC goes there, everything else to stderr.
            if let Err(e) = uplink::run(&uplink, tokio::io::stdin(), tokio::io::stdout()).await {
                eprintln!("moat-guest mcp: {e}");
                std::process::exit(1);
            }
        }
        Err(message) => {
            eprintln!("moat-guest: {message}\n{USAGE}");
            std::process::exit(2);
        }
    }
}

async fn serve(
    control: Option<ListenAddr>,
    mcp: Option<ListenAddr>,
    image_info: Option<PathBuf>,
) -> Result<(), String> {
    let image = control::image_info(image_info.as_deref())?;
    // Bind both before serving either, so a bad address fails at once.
    let control = control.map(|a| Listener::bind(&a).map(|l| (a, l))).transpose()?;
    let mcp = mcp.map(|a| Listener::bind(&a).map(|l| (a, l))).transpose()?;
    let mut tasks = tokio::task::JoinSet::new();
    if let Some((addr, listener)) = mcp {
        eprintln!("moat-guest {} MCP on {addr}", control::AGENT_VERSION);
        tasks.spawn(serve_mcp(listener));
    }
    match control {
        Some((addr, listener)) => {
            eprintln!("moat-guest {} control channel on {addr}", control::AGENT_VERSION);
            control::serve(listener, image).await
        }
        None => {
            while tasks.join_next().await.is_some() {}
            Ok(())
        }
    }
}

/// One MCP session per connection; background processes are shared by all of them.
async fn serve_mcp(listener: Listener) -> Result<(), String> {
    let jobs = Arc::new(exec::Jobs::default());
    loop {
        let (read, write) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                eprintln!("moat-guest: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let server = mcp::GuestServer::new(jobs.clone());
        tokio::spawn(async move {
            let transport = rmcp::transport::async_rw::AsyncRwTransport::new_server(read, write)
                .with_max_line_length(mcp::MAX_MESSAGE);
            match server.serve(transport).await {
                Ok(running) => {
                    let _ = running.waiting().await;
                    // A session may have moved a 32 MiB file: give freed memory back to the guest.
                    // SAFETY: malloc_trim only releases free heap pages; no pointers are involved.
                    unsafe { libc::malloc_trim(0) };
                }
                Err(e) => eprintln!("moat-guest: MCP session failed to start: {e}"),
            }
        });
    }
}

#[derive(Debug, PartialEq)]
enum Command {
    Version,
    Serve { control: Option<ListenAddr>, mcp: Option<ListenAddr>, image_info: Option<PathBuf> },
    Mcp { uplink: Uplink },
}

fn parse(args: &[String]) -> Result<Command, String> {
    match args.first().map(String::as_str) {
        Some("--version" | "-V") => Ok(Command::Version),
        Some("serve") => {
            let (mut control, mut mcp, mut image_info) = (None, None, None);
            let mut rest = args[1..].iter();
            while let Some(flag) = rest.next() {
                let value = rest.next().ok_or_else(|| format!("{flag} needs a value"))?;
                match flag.as_str() {
                    "--control" => control = Some(value.parse()?),
                    "--mcp" => mcp = Some(value.parse()?),
                    "--image-info" => image_info = Some(PathBuf::from(value)),
                    other => return Err(format!("unknown flag {other}")),
                }
            }
            if control.is_none() && mcp.is_none() {
                return Err("serve needs --control or --mcp (or both)".into());
            }
            Ok(Command::Serve { control, mcp, image_info })
        }
        Some("mcp") => match &args[1..] {
            [] => Ok(Command::Mcp { uplink: Uplink::Vsock }),
            [flag, value] if flag == "--uplink" => Ok(Command::Mcp { uplink: value.parse()? }),
            _ => Err("mcp takes only --uplink vsock|unix:PATH".into()),
        },
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
            parse(&s(&["serve", "--control", "vsock:100", "--mcp", "unix:/run/g.sock"])),
            Ok(Command::Serve {
                control: Some(ListenAddr::Vsock(100)),
                mcp: Some(ListenAddr::Unix("/run/g.sock".into())),
                image_info: None
            })
        );
        assert!(parse(&s(&["serve", "--mcp", "tcp:1"])).unwrap_err().contains("vsock:PORT"));
        assert!(parse(&s(&["serve"])).unwrap_err().contains("--control or --mcp"));
        assert!(parse(&s(&["serve", "--mcp"])).unwrap_err().contains("needs a value"));
        assert!(parse(&s(&[])).is_err());
        assert_eq!(parse(&s(&["mcp"])), Ok(Command::Mcp { uplink: Uplink::Vsock }));
        assert_eq!(parse(&s(&["mcp", "--uplink", "unix:/u"])), Ok(Command::Mcp { uplink: Uplink::Unix("/u".into()) }));
        assert!(parse(&s(&["mcp", "--x"])).is_err());
    }
}
