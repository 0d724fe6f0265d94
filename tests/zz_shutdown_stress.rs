mod common;

use common::Harness;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_a() {
    for round in 0..25 {
        let harness = Harness::start("stressa", |_| {}).await;
        harness.fund("u", &format!("g-{round}"), 5).await;
        let started = std::time::Instant::now();
        harness.finish().await;
        eprintln!("A round {round} stop took {:?}", started.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_b() {
    for round in 0..25 {
        let harness = Harness::start("stressb", |_| {}).await;
        harness.fund("u", &format!("g-{round}"), 5).await;
        let started = std::time::Instant::now();
        harness.finish().await;
        eprintln!("B round {round} stop took {:?}", started.elapsed());
    }
}
