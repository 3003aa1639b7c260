//! `latent info` over several files: each is reported, a bad one does not hide the ones after
//! it, and the exit status says something failed.
mod common;

use common::latent;
use latent::output::write_png;

#[test]
fn every_file_is_reported_and_a_missing_one_fails_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.png");
    let b = dir.path().join("b.png");
    let missing = dir.path().join("missing.png");
    let rgb = vec![7u8; 4 * 4 * 3];
    write_png(&a, &rgb, 4, 4, "first prompt\nSteps: 1", false).unwrap();
    write_png(&b, &rgb, 4, 4, "second prompt\nSteps: 2", false).unwrap();
    let paths = [&a, &missing, &b].map(|p| p.display().to_string());
    let o = latent(&["info", &paths[0], &paths[1], &paths[2]]);
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        out.contains("first prompt") && out.contains("second prompt"),
        "{out}"
    );
    assert!(err.contains("missing.png"), "{err}");
    assert!(
        err.contains("1 of 3 files had no readable parameters"),
        "{err}"
    );
}
