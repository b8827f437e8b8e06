//! Runs the KEDA conformance test (`tests/keda/test_external_scaler.py`): a Python `grpcio`
//! client generated from KEDA's published proto calls the aggregator's scaler. Skips with a reason
//! when Python or grpcio is missing, unless `HEADROOM_REQUIRE_PRIVILEGED_TESTS=1` (CI) makes
//! that a failure.

use std::path::Path;
use std::process::Command;

#[test]
fn keda_grpcio_client_conformance() {
    let require = std::env::var("HEADROOM_REQUIRE_PRIVILEGED_TESTS").is_ok_and(|v| v == "1");
    let probe = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        let reason = "python3 with grpcio and grpcio-tools is not installed (pip install grpcio grpcio-tools)";
        assert!(
            !require,
            "keda_grpcio_client_conformance cannot run: {reason}"
        );
        eprintln!("SKIP keda_grpcio_client_conformance: {reason}");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new("python3")
        .arg(root.join("tests/keda/test_external_scaler.py"))
        .current_dir(root)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "KEDA conformance failed:\n{text}");
    assert!(text.contains("Ran 2 tests"), "{text}");
}
