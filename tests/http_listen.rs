//! A worker whose `http.listen` address is taken exits 1 at start with
//! an error that names the fixes, instead of running without its endpoint.

mod common;

use common::run_binary;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taken_address_exits_1() {
    let port_holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
    let address = port_holder.local_addr().expect("read the bound address").to_string();

    // The endpoint listens before the database is reached, so none is needed.
    let output = run_binary(
        &["run"],
        &[
            ("STREAM_CREDITS__HTTP__LISTEN", address.as_str()),
            ("STREAM_CREDITS__DATABASE__URL", "postgres://root@127.0.0.1:1/none"),
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains(&format!("cannot listen on http.listen {address}")), "stderr: {stderr}");
    assert!(stderr.contains("set http.listen to \"\""), "stderr: {stderr}");
    drop(port_holder);
}
