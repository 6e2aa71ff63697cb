//! Scenario files and the checks each step makes.

use std::collections::BTreeMap;
use std::path::Path;

use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use rmcp::transport::TokioChildProcess;
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    /// Boots VMs: the runner gives the gateway the guest image as `base`, and string arguments
    /// equal to `$DEBIAN_IMAGE`, `$GIT_IMAGE` or `$GIT_DATA_IMAGE` become those images' paths
    /// (`--guest-image`, `--debian-image`, `--git-image`).
    #[serde(default)]
    pub images: bool,
    /// Makes networks: the runner gives the gateway's embedded node a network namespace of its
    /// own (made for the scenario, removed after it), so nothing touches the host's network.
    #[serde(default)]
    pub netns: bool,
    /// Plans disk layouts: the runner makes two 64 MiB loop disks for the scenario (as root),
    /// a blank one (`$FREE_DISK`) and one with a mounted ext4 filesystem (`$MOUNTED_DISK`),
    /// removed after it. Nothing in a scenario may write to them: the embedded node is
    /// installer-only.
    #[serde(default)]
    pub loop_disks: bool,
    #[serde(rename = "step")]
    pub steps: Vec<Step>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub tool: String,
    #[serde(default)]
    pub args: BTreeMap<String, toml::Value>,
    /// JSON pointer into the structured result → expected value.
    #[serde(default)]
    pub expect: BTreeMap<String, toml::Value>,
    /// Expect a failure: "tool" (result with isError) or "rpc" (JSON-RPC error).
    pub expect_error: Option<ErrorKind>,
    /// Text the answer (result text or error message) must contain.
    pub contains: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorKind {
    Tool,
    Rpc,
}

/// What a call produced, reduced to what steps check.
#[derive(Debug, PartialEq)]
pub enum Answer {
    Ok { structured: Value, text: String },
    ToolError { text: String },
    RpcError { message: String },
}

/// The images a scenario with `images = true` boots.
#[derive(Debug, Clone, Default)]
pub struct Images {
    pub guest: Option<std::path::PathBuf>,
    pub debian: Option<std::path::PathBuf>,
    /// The git service images' directory (rootfs.ext4 and data.ext4).
    pub git: Option<std::path::PathBuf>,
}

/// Runs every step against a fresh `moat serve` in a private HOME.
pub async fn run(moat: &Path, scenario: &Scenario, images: &Images) -> anyhow::Result<Vec<Result<(), String>>> {
    let home = tempfile::tempdir()?;
    // Placeholder → image path, for `image_import {source}`.
    let mut paths: Vec<(&str, String)> = Vec::new();
    if scenario.images {
        let (Some(guest), Some(image)) = (&images.guest, &images.debian) else {
            anyhow::bail!("scenario {} boots VMs: pass --guest-image and --debian-image", scenario.name);
        };
        let dir = home.path().join(".local/state/moat/images");
        std::fs::create_dir_all(&dir)?;
        std::os::unix::fs::symlink(std::fs::canonicalize(guest)?, dir.join("base"))?;
        paths.push(("$DEBIAN_IMAGE", std::fs::canonicalize(image)?.display().to_string()));
        if let Some(git) = &images.git {
            let git = std::fs::canonicalize(git)?;
            paths.push(("$GIT_IMAGE", git.join("rootfs.ext4").display().to_string()));
            paths.push(("$GIT_DATA_IMAGE", git.join("data.ext4").display().to_string()));
        }
    }
    let netns = if scenario.netns { Some(Netns::new(&scenario.name)?) } else { None };
    let disks = if scenario.loop_disks { Some(LoopDisks::new()?) } else { None };
    if let Some(disks) = &disks {
        paths.push(("$FREE_DISK", disks.free.clone()));
        paths.push(("$MOUNTED_DISK", disks.mounted.clone()));
    }
    #[allow(clippy::disallowed_methods)] // starts the gateway under evaluation
    let mut cmd = tokio::process::Command::new(moat);
    if let Some(ns) = &netns {
        cmd.env("MOAT_NODE_NETNS", &ns.0);
    }
    cmd.arg("serve")
        .env("HOME", home.path())
        .env_remove("XDG_STATE_HOME")
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("XDG_DATA_HOME");
    let client = ().serve(TokioChildProcess::new(cmd)?).await?;
    let mut outcomes = Vec::new();
    for step in &scenario.steps {
        let mut params = CallToolRequestParams::new(step.tool.clone());
        let mut args = serde_json::to_value(&step.args)?;
        if let Some(name) = substitute(&mut args, &paths) {
            anyhow::bail!(
                "scenario {} uses {name}: pass the image it names (--debian-image, --git-image)",
                scenario.name
            );
        }
        if let Value::Object(map) = args {
            params = params.with_arguments(map);
        }
        let answer = match client.call_tool(params).await {
            Ok(r) if r.is_error == Some(true) => Answer::ToolError { text: serde_json::to_string(&r.content)? },
            Ok(r) => Answer::Ok {
                structured: r.structured_content.clone().unwrap_or(Value::Null),
                text: serde_json::to_string(&r.content)?,
            },
            Err(rmcp::ServiceError::McpError(e)) => Answer::RpcError { message: e.message.to_string() },
            Err(e) => return Err(e.into()),
        };
        outcomes.push(check(step, &answer));
    }
    client.cancel().await?;
    Ok(outcomes)
}

/// Replaces every string in `value` (nested ones too) that is exactly a placeholder of `paths`;
/// the first placeholder it has no value for, if any.
fn substitute(value: &mut Value, paths: &[(&str, String)]) -> Option<String> {
    match value {
        Value::String(s) if s.starts_with('$') => match paths.iter().find(|(p, _)| p == s) {
            Some((_, path)) => {
                *s = path.clone();
                None
            }
            None => Some(s.clone()),
        },
        Value::Array(items) => items.iter_mut().find_map(|v| substitute(v, paths)),
        Value::Object(map) => map.values_mut().find_map(|v| substitute(v, paths)),
        _ => None,
    }
}

/// Two loop disks made for one scenario: one blank, one holding a mounted ext4 filesystem;
/// unmounted and detached when dropped.
struct LoopDisks {
    free: String,
    mounted: String,
    mountpoint: tempfile::TempDir,
    _files: tempfile::TempDir,
}

impl LoopDisks {
    fn new() -> anyhow::Result<LoopDisks> {
        let files = tempfile::tempdir()?;
        let mountpoint = tempfile::tempdir()?;
        let run = |program: &str, args: &[&str]| -> anyhow::Result<String> {
            #[allow(clippy::disallowed_methods)] // the scenario's own loop disks
            let out = std::process::Command::new(program).args(args).output()?;
            anyhow::ensure!(
                out.status.success(),
                "{program} {} failed ({}): scenarios with loop_disks need root, losetup and mkfs.ext4",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        let mut devices = Vec::new();
        for name in ["free.img", "mounted.img"] {
            let file = files.path().join(name);
            std::fs::File::create(&file)?.set_len(64 << 20)?;
            devices.push(run("losetup", &["--find", "--show", file.to_str().unwrap_or_default()])?);
        }
        let disks = LoopDisks { free: devices[0].clone(), mounted: devices[1].clone(), mountpoint, _files: files };
        run("mkfs.ext4", &["-q", "-F", &disks.mounted])?;
        run("mount", &[&disks.mounted, disks.mountpoint.path().to_str().unwrap_or_default()])?;
        Ok(disks)
    }
}

impl Drop for LoopDisks {
    fn drop(&mut self) {
        #[allow(clippy::disallowed_methods)] // the scenario's own loop disks
        let run = |program: &str, args: &[&str]| std::process::Command::new(program).args(args).status();
        let _ = run("umount", &[self.mountpoint.path().to_str().unwrap_or_default()]);
        let _ = run("losetup", &["-d", &self.free]);
        let _ = run("losetup", &["-d", &self.mounted]);
    }
}

/// A network namespace made for one scenario, removed when dropped.
struct Netns(String);

impl Netns {
    fn new(scenario: &str) -> anyhow::Result<Netns> {
        let name = format!("moat-eval-{}-{}", std::process::id(), scenario.chars().take(12).collect::<String>());
        let ns = Netns(name);
        for argv in [vec!["netns", "add", &ns.0], vec!["-n", &ns.0, "link", "set", "lo", "up"]] {
            #[allow(clippy::disallowed_methods)] // the scenario's own namespace
            let status = std::process::Command::new("ip").args(&argv).status()?;
            anyhow::ensure!(
                status.success(),
                "ip {} failed: scenarios with netns need root and iproute2",
                argv.join(" ")
            );
        }
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        #[allow(clippy::disallowed_methods)] // the scenario's own namespace
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Compares one answer with what the step expects.
pub fn check(step: &Step, answer: &Answer) -> Result<(), String> {
    let text = match (answer, step.expect_error) {
        (Answer::Ok { structured, text }, None) => {
            for (pointer, want) in &step.expect {
                let want = serde_json::to_value(want).map_err(|e| e.to_string())?;
                match structured.pointer(pointer) {
                    Some(got) if *got == want => {}
                    Some(got) => return Err(format!("{pointer} is {got}, expected {want}")),
                    None => return Err(format!("{pointer} is missing from {structured}")),
                }
            }
            text
        }
        (Answer::ToolError { text }, Some(ErrorKind::Tool)) => text,
        (Answer::RpcError { message }, Some(ErrorKind::Rpc)) => message,
        (got, want) => {
            return Err(format!("expected {}, got {got:?}", want.map_or("success".into(), |k| format!("{k:?} error"))));
        }
    };
    match &step.contains {
        Some(needle) if !text.contains(needle.as_str()) => Err(format!("answer does not contain {needle:?}: {text}")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn step(toml_text: &str) -> Step {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn check_table() {
        let ok = Answer::Ok { structured: json!({"role": "reader", "n": 2}), text: "role reader".into() };
        let tool_err = Answer::ToolError { text: "no node named `x`".into() };
        let rpc_err = Answer::RpcError { message: "unknown tool `y`".into() };
        let cases: Vec<(&str, &Answer, bool)> = vec![
            ("tool = 'whoami'\nexpect = { '/role' = 'reader' }", &ok, true),
            ("tool = 'whoami'\nexpect = { '/n' = 2 }", &ok, true),
            ("tool = 'whoami'\nexpect = { '/role' = 'agent' }", &ok, false),
            ("tool = 'whoami'\nexpect = { '/missing' = 1 }", &ok, false),
            ("tool = 'whoami'\ncontains = 'reader'", &ok, true),
            ("tool = 'node_inspect'\nexpect_error = 'tool'\ncontains = 'no node'", &tool_err, true),
            ("tool = 'node_inspect'\nexpect_error = 'rpc'", &tool_err, false),
            ("tool = 'y'\nexpect_error = 'rpc'\ncontains = 'unknown tool'", &rpc_err, true),
            ("tool = 'y'", &rpc_err, false),
        ];
        for (text, answer, pass) in cases {
            assert_eq!(check(&step(text), answer).is_ok(), pass, "{text}");
        }
    }

    #[test]
    fn shipped_scenarios_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut count = 0;
        for (dir, boots) in [(root.clone(), false), (root.join("images"), true)] {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                let s: Scenario = toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(!s.steps.is_empty());
                assert_eq!(s.images, boots, "{}: scenarios that boot VMs live in scenarios/images", path.display());
                count += 1;
            }
        }
        assert!(count > 2);
    }
}
