//! The real `vmesh server` on damaged state: an emptied, zeroed or
//! bit-flipped store, a missing store, a missing `ca/`. Each is refused
//! with a message naming the problem and the way back, and the way back
//! (`vmesh store restore`, restoring `ca/`) works.

use std::path::Path;
use std::process::{Command, Output};

use vmesh_testkit::LocalServer;

const VMESH: &str = env!("CARGO_BIN_EXE_vmesh");

fn start(data_dir: &Path, extra: &[&str]) -> LocalServer {
    LocalServer::start(Path::new(VMESH), data_dir, extra, &[]).unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `vmesh server` on `data_dir`, expected to refuse to start: its stderr.
fn refusal(data_dir: &Path) -> String {
    let output = LocalServer::command_for(Path::new(VMESH), data_dir, &[])
        .output()
        .unwrap();
    assert!(
        !output.status.success(),
        "the server started: {}",
        text(&output.stdout)
    );
    text(&output.stderr)
}

fn run(server: &LocalServer, args: &[&str]) -> Output {
    let output = server.command(args).output().unwrap();
    assert!(
        output.status.success(),
        "vmesh {args:?}: {}",
        text(&output.stderr)
    );
    output
}

fn store_command(args: &[&str]) -> Output {
    Command::new(VMESH)
        .arg("store")
        .args(args)
        .output()
        .unwrap()
}

fn entries(count: usize, prefix: &str) -> String {
    (0..count)
        .map(|i| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {prefix}-{i}, namespace: default}}\nspec: {{address: 10.1.{}.{}}}\n---\n",
                i / 200,
                i % 200
            )
        })
        .collect()
}

/// Overwrites `len` bytes of `file` at `offset` with zeros, or flips them.
fn damage(file: &Path, offset: usize, len: usize, zero: bool) {
    let mut bytes = std::fs::read(file).unwrap();
    for b in &mut bytes[offset..offset + len] {
        *b = if zero { 0 } else { !*b };
    }
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn damaged_state_is_refused_with_the_way_back_and_restore_brings_the_mesh_back() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let manifests = dir.path().join("entries.yaml");
    std::fs::write(&manifests, entries(300, "vm")).unwrap();
    // Objects applied, then a restart: its start-up backup holds them.
    let server = start(&data, &[]);
    run(&server, &["apply", "-f", manifests.to_str().unwrap()]);
    drop(server);
    let server = start(&data, &[]);
    std::fs::write(&manifests, entries(1, "late")).unwrap();
    run(&server, &["apply", "-f", manifests.to_str().unwrap()]);
    drop(server);

    let store = data.join("store.redb");
    let pristine = std::fs::read(&store).unwrap();
    let object_at = pristine
        .windows(8)
        .position(|w| w == b"\"vm-150\"")
        .expect("an object's bytes are in the file");
    let recovery = format!("vmesh store restore --data-dir {}", data.display());
    type Breakage<'a> = Box<dyn Fn() + 'a>;
    let cases: [(&str, Breakage, &str); 4] = [
        (
            "emptied",
            Box::new(|| std::fs::write(&store, b"").unwrap()),
            "empty (0 bytes)",
        ),
        (
            "a zeroed page",
            Box::new(|| damage(&store, object_at - object_at % 4096, 4096, true)),
            "is damaged",
        ),
        (
            "flipped bytes",
            Box::new(|| damage(&store, object_at + 3, 2, false)),
            "is damaged",
        ),
        (
            "deleted",
            Box::new(|| std::fs::remove_file(&store).unwrap()),
            "is missing",
        ),
    ];
    for (what, break_it, problem) in cases {
        std::fs::write(&store, &pristine).unwrap();
        break_it();
        let damaged = std::fs::read(&store).ok();
        let message = refusal(&data);
        assert!(message.contains(problem), "{what}: {message}");
        assert!(message.contains(&recovery), "{what}: {message}");
        assert!(
            std::fs::read(&store).ok() == damaged,
            "{what}: the refused store is left as it was"
        );
        if store.exists() {
            let check = store_command(&["check", "--data-dir", data.to_str().unwrap()]);
            assert_eq!(check.status.code(), Some(1), "{what}: store check");
            assert!(text(&check.stderr).contains(problem), "{what}");
        }
    }

    // The way back: the newest good backup, the damaged file kept beside it.
    std::fs::write(&store, b"").unwrap();
    let restored = store_command(&["restore", "--data-dir", data.to_str().unwrap()]);
    assert!(restored.status.success(), "{}", text(&restored.stderr));
    let said = text(&restored.stdout);
    assert!(said.contains("kept the replaced store as"), "{said}");
    let check = store_command(&["check", "--data-dir", data.to_str().unwrap()]);
    assert!(check.status.success(), "{}", text(&check.stderr));
    assert!(text(&check.stdout).contains("intact"));
    let kept = std::fs::read_dir(&data)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("store.redb.damaged-")
        })
        .count();
    assert_eq!(kept, 1);
    let server = start(&data, &[]);
    let listed = text(&run(&server, &["get", "workloadentries", "-n", "default"]).stdout);
    assert_eq!(listed.matches("vm-").count(), 300, "{listed}");
    assert!(
        !listed.contains("late-0"),
        "written after the backup, so not in it"
    );
    drop(server);

    // A lost ca/ would mean a new root that no VM trusts: refused, and fine
    // again once ca/ is back.
    let ca = data.join("ca");
    let ca_aside = dir.path().join("ca-aside");
    std::fs::rename(&ca, &ca_aside).unwrap();
    let message = refusal(&data);
    assert!(message.contains("ca is missing"), "{message}");
    assert!(message.contains("--accept-new-root"), "{message}");
    assert!(!ca.exists(), "no new CA was made");
    std::fs::rename(&ca_aside, &ca).unwrap();
    drop(start(&data, &[]));

    // A different root (another ca/) is refused too, unless accepted.
    let other = dir.path().join("other");
    drop(start(&other, &[]));
    std::fs::remove_dir_all(&ca).unwrap();
    copy_dir(&other.join("ca"), &ca);
    let message = refusal(&data);
    assert!(
        message.contains("is not the one this store was set up with"),
        "{message}"
    );
    drop(start(&data, &["--accept-new-root"]));
    drop(start(&data, &[]));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// A crash is not damage: a server killed while writing starts again on its
/// store, with every write it acknowledged.
#[test]
fn a_server_killed_mid_write_starts_again_with_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for round in 0..3 {
        let server = start(&data, &[]);
        let pid = server.pid();
        let api = server.api().to_string();
        let batches = dir.path().to_path_buf();
        let writer = std::thread::spawn(move || {
            let mut acknowledged = 0;
            for batch in 0..40 {
                let file = batches.join(format!("batch-{round}-{batch}.yaml"));
                std::fs::write(&file, entries(25, &format!("r{round}-b{batch}"))).unwrap();
                let output = Command::new(VMESH)
                    .args(["apply", "-f"])
                    .arg(&file)
                    .env("VMESH_SERVER", &api)
                    .output()
                    .unwrap();
                if !output.status.success() {
                    break;
                }
                acknowledged += 1;
            }
            acknowledged
        });
        std::thread::sleep(std::time::Duration::from_millis(400 + 150 * round));
        let killed = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let acknowledged = writer.join().unwrap();
        drop(server);

        let server = start(&data, &[]);
        let listed = text(&run(&server, &["get", "workloadentries", "-n", "default"]).stdout);
        for batch in 0..acknowledged {
            for i in 0..25 {
                let name = format!("r{round}-b{batch}-{i} ");
                assert!(
                    listed.contains(&name),
                    "round {round}: {name} was acknowledged, then lost"
                );
            }
        }
        drop(server);
    }
}
