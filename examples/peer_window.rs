//! Measures how long a write stays invisible through another pgcache instance: `writer`
//! updates a row (through one instance, or straight to Postgres when the bypass triggers are
//! installed), and `reader` — another instance that holds the row in its cache — is polled
//! until it answers with the new value. Used by `bench/peers.sh`.
//!
//! Usage: peer_window WRITER_URL READER_URL ROUNDS
//! Expects a table `window_probe (id int PRIMARY KEY, v text)` with a row id = 1.

use std::time::{Duration, Instant};

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
}

async fn read(c: &tokio_postgres::Client) -> String {
    for m in c.simple_query("SELECT v FROM window_probe WHERE id = 1").await.expect("read") {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            return r.get(0).unwrap_or_default().to_owned();
        }
    }
    String::new()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, writer, reader, rounds] = args.as_slice() else {
        eprintln!("usage: peer_window WRITER_URL READER_URL ROUNDS");
        std::process::exit(2);
    };
    let rounds: usize = rounds.parse().expect("ROUNDS is a number");
    let (w, r) = (connect(writer).await, connect(reader).await);
    let mut windows = Vec::with_capacity(rounds);
    let mut current = read(&r).await;
    for i in 0..rounds {
        // The reader holds the current value in its cache.
        while read(&r).await != current {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let next = format!("round {i}");
        w.batch_execute(&format!("UPDATE window_probe SET v = '{next}' WHERE id = 1")).await.expect("write");
        let acknowledged = Instant::now();
        while read(&r).await != next {
            if acknowledged.elapsed() > Duration::from_secs(10) {
                eprintln!("round {i}: still stale after 10 s");
                std::process::exit(1);
            }
        }
        windows.push(acknowledged.elapsed());
        current = next;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    windows.sort();
    let at = |q: f64| windows[((windows.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1000.0;
    println!("{:.2} {:.2} {:.2}", at(0.5), at(0.99), at(1.0));
}
