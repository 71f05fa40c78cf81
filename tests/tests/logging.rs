//! What a plugin logs reaches the host's log: its `tracing` events, with the fields of the spans
//! they happened in.

use std::time::Duration;

use tests::{Host, HostOptions, fixture_plugin, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_event_arrives_with_the_fields_of_its_enclosing_spans() {
    let host = Host::start(
        &fixture_plugin(""),
        HostOptions {
            env: vec![("RUST_LOG".into(), "info".into())],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(host.body("/traced").await, "traced\n");

    // Outermost span first, as tracing-subscriber's fmt writes them; the debug span between
    // them is below the host's level, so neither it nor its field shows.
    let expected = r#"req{id=7}:inner{x=1}: traced event k="v""#;
    wait_until(
        Duration::from_secs(10),
        "the plugin's event with its spans' fields in the host log",
        || host.log().contains(expected),
    )
    .await;
    let log = host.log();
    let line = log.lines().find(|l| l.contains(expected)).unwrap();
    assert!(line.starts_with("worker["), "{line}");
    assert!(line.contains(" INFO "), "{line}");
    assert!(line.contains("module=fixture_plugin"), "{line}");
    // Written while the host served `/traced`: the line names the request.
    assert!(line.contains(r#"path="/traced""#), "{line}");
    assert!(
        !line.contains("hidden") && !line.contains("secret"),
        "{line}"
    );
}
