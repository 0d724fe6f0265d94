//! The worker's HTTP endpoint: readiness, metrics and the read-only
//! account view with open holds.

use std::sync::Arc;
use std::time::Duration;

use stream_credits::messages::{CreditsGranted, EndStatus, StreamEnded, StreamStarted, Usage};
use stream_credits::producer::{Producer, StartReply};
use stream_credits::settings::{SecretUrl, Settings};
use stream_credits::worker;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Sends a GET and returns the status code and body.
async fn get(address: &str, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("the HTTP endpoint accepts connections");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("an HTTP status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_serves_accounts_and_metrics() {
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let database = format!("sc_t_http_{tag}");
    let address = format!("127.0.0.1:{}", free_port());
    let mut settings = Settings::default();
    settings.database.url = SecretUrl::new(format!("postgres://127.0.0.1:5432/{database}"));
    settings.topology.prefix = format!("t-http-{tag}");
    settings.topology.shards = 2;
    settings.http.listen = address.clone();
    let settings = Arc::new(settings);

    let shutdown = CancellationToken::new();
    let running = tokio::spawn(worker::run(settings.clone(), shutdown.clone()));
    let producer = Producer::connect(&settings, Duration::from_secs(20))
        .await
        .expect("RabbitMQ on 127.0.0.1:5672; start it with `rabbitmq-server -detached`");

    let user = format!("u-{tag}");
    let grant = CreditsGranted {
        kind: Default::default(),
        message_id: format!("{user}-grant"),
        user_id: user.clone(),
        amount: 100_000,
        reason: None,
        occurred_at: chrono::Utc::now(),
    };
    producer.publish(&user, &grant.message_id, &grant).await.unwrap();
    let start = StreamStarted {
        kind: Default::default(),
        message_id: format!("{user}-start"),
        user_id: user.clone(),
        stream_id: "s-open".to_owned(),
        model: "gpt-4o-mini".to_owned(),
        messages: None,
        prompt: None,
        prompt_tokens: Some(100),
        max_output_tokens: Some(1000),
        occurred_at: chrono::Utc::now(),
    };
    let StartReply::Granted(granted) = producer.start(&start).await.unwrap() else {
        panic!("the start was denied");
    };

    let (status, _) = get(&address, "/healthz").await;
    assert_eq!(status, 200);
    let (status, _) = get(&address, "/readyz").await;
    assert_eq!(status, 200);

    let (status, body) = get(&address, &format!("/accounts/{user}")).await;
    assert_eq!(status, 200);
    let account: serde_json::Value = serde_json::from_str(&body).expect("a JSON account");
    assert_eq!(account["balance"], 100_000);
    assert_eq!(account["reserved"], granted.reserved);
    assert_eq!(account["holds"].as_array().map(Vec::len), Some(1));
    assert_eq!(account["holds"][0]["stream_id"], "s-open");
    assert_eq!(account["holds"][0]["reserved"], granted.reserved);

    let (status, _) = get(&address, "/accounts/u-nobody").await;
    assert_eq!(status, 404);
    let (status, body) = get(&address, "/accounts/u%00nul").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("NUL"), "{body}");

    let (status, metrics) = get(&address, "/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("stream_credits_holds_open 1"), "{metrics}");
    assert!(metrics.contains("stream_credits_messages_total"), "{metrics}");
    assert!(metrics.contains("stream_credits_reservation_latency_seconds_count 1"), "{metrics}");

    let end = StreamEnded {
        kind: Default::default(),
        message_id: format!("{user}-end"),
        user_id: user.clone(),
        stream_id: "s-open".to_owned(),
        status: EndStatus::Completed,
        usage: Some(Usage {
            prompt_tokens: 100,
            completion_tokens: 10,
            cached_prompt_tokens: None,
        }),
        occurred_at: chrono::Utc::now(),
    };
    producer.publish(&user, &end.message_id, &end).await.unwrap();
    producer.settlement(&user, "s-open").await.expect("the stream settles");
    let (_, metrics) = get(&address, "/metrics").await;
    assert!(metrics.contains("stream_credits_holds_open 0"), "{metrics}");
    assert!(metrics.contains("stream_credits_settle_latency_seconds_count 1"), "{metrics}");
    assert!(
        metrics.contains("stream_credits_settle_latency_seconds_bucket{le=\"30\"} 1"),
        "{metrics}"
    );

    shutdown.cancel();
    running.await.unwrap().expect("the worker stops cleanly");
    remove_topology(&settings).await;
    let admin = sqlx::PgPool::connect("postgres://127.0.0.1:5432/postgres").await.unwrap();
    let drop = format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)");
    sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&admin).await.unwrap();
}

/// Deletes the test's queues and exchanges.
async fn remove_topology(settings: &Settings) {
    let connection = stream_credits::broker::connect(&settings.amqp, "http test cleanup")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let names = stream_credits::topology::Names::new(&settings.topology.prefix);
    let mut queues: Vec<String> = (0..settings.topology.shards).map(|index| names.shard(index)).collect();
    queues.push(names.dead.clone());
    for queue in queues {
        channel.queue_delete(queue.as_str().into(), Default::default()).await.unwrap();
    }
    for exchange in [&names.events, &names.dlx, &names.results] {
        channel.exchange_delete(exchange.as_str().into(), Default::default()).await.unwrap();
    }
}
