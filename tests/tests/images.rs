//! End-to-end image store: an image of many layers still mounts (overlayfs takes its
//! options in one page, so the layer paths must be short) with the upper layers winning.

use keel_tests::{BOOT_TIMEOUT, boot, build_host};

const LAYERS: usize = 150;

#[test]
fn an_image_of_150_layers_mounts_with_the_top_layer_winning() {
    let work = tempfile::tempdir().unwrap();
    let mut layers = vec!["\"busybox:/bin/busybox\"".to_string()];
    for i in 0..LAYERS {
        let dir = work.path().join(format!("layer{i}"));
        std::fs::create_dir_all(dir.join("layers")).unwrap();
        std::fs::write(dir.join(format!("layers/{i}")), "").unwrap();
        // Every layer rewrites the same file: the last one must be what the container sees.
        std::fs::write(dir.join("top"), format!("{i}\n")).unwrap();
        layers.push(format!("\"{}\"", dir.display()));
    }
    let host = work.path().join("host.toml");
    std::fs::write(
        &host,
        format!(
            r#"[host]
hostname = "layers"

[images.tall]
layers = [{}]
env = ["PATH=/bin"]

[containers.count]
image = "tall"
kind = "onboot"
network = "none"
command = ["sh", "-c", "echo layers=$(ls /layers | wc -l) top=$(cat /top)"]
"#,
            layers.join(", ")
        ),
    )
    .unwrap();
    let dir = build_host(&host, &work.path().join("out"));
    let vm = boot(&dir, &[]);
    let line = vm.wait_for_line("[count] layers=", BOOT_TIMEOUT).unwrap();
    assert!(
        line.contains(&format!("layers={LAYERS} top={}", LAYERS - 1)),
        "{line}"
    );
}
