//! NATS JetStream (async-nats): a file-storage work-queue stream, publishes awaited to their
//! PubAck; one durable pull consumer shared by the consumers, fetched in batches with explicit
//! acks. One client connection per producer and per consumer, as independent clients would have.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::watch;

use super::{drive, message_id, pipeline, unique_suffix, Report, Tally, Workload};

const CONSUMER_NAME: &str = "keel-bench";
/// Messages per pull request; the same window as RabbitMQ's prefetch.
const FETCH_BATCH: usize = 256;
/// A pull request waits at most this long for messages, so consumers notice the stop signal.
const FETCH_EXPIRES_MS: u64 = 500;

pub async fn run_nats(url: &str, w: &Workload) -> Result<Report> {
    let suffix = unique_suffix()?;
    // Stream names may not contain '.', subjects use it as a separator.
    let stream_name = format!("KEEL_BENCH_{suffix}");
    let subject = format!("keel-bench.{suffix}");
    let admin = jetstream::new(connect(url).await?);
    let stream = admin
        .create_stream(stream::Config {
            name: stream_name.clone(),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::File,
            // Acked messages are removed, as from a queue.
            retention: stream::RetentionPolicy::WorkQueue,
            ..stream::Config::default()
        })
        .await
        .with_context(|| format!("creating stream {stream_name}"))?;
    let created = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(CONSUMER_NAME.to_string()),
            ack_policy: consumer::AckPolicy::Explicit,
            // Room for every consumer's batch, so the server's default (1000) is not the limit.
            max_ack_pending: (w.consumers * FETCH_BATCH * 2) as i64,
            ..consumer::pull::Config::default()
        })
        .await
        .with_context(|| format!("creating durable consumer on {stream_name}"));

    let result = match created {
        Ok(_) => measure(url, &stream_name, &subject, w).await,
        Err(e) => Err(e),
    };
    // Delete the stream even after a failed run so runs do not pile up on the server.
    let deleted = admin
        .delete_stream(&stream_name)
        .await
        .with_context(|| format!("deleting stream {stream_name}"));
    let report = result?;
    deleted?;
    Ok(report)
}

async fn connect(url: &str) -> Result<async_nats::Client> {
    async_nats::connect(url).await.context("connecting")
}

async fn measure(url: &str, stream_name: &str, subject: &str, w: &Workload) -> Result<Report> {
    let mut producers = Vec::with_capacity(w.producers);
    for index in 0..w.producers {
        let client = connect(url)
            .await
            .with_context(|| format!("producer {index}"))?;
        producers.push(jetstream::new(client));
    }
    let mut consumers = Vec::with_capacity(w.consumers);
    for index in 0..w.consumers {
        let client = connect(url)
            .await
            .with_context(|| format!("consumer {index}"))?;
        let pull: consumer::PullConsumer = jetstream::new(client.clone())
            .get_consumer_from_stream(CONSUMER_NAME, stream_name)
            .await
            .with_context(|| format!("consumer {index}: opening {CONSUMER_NAME}"))?;
        consumers.push((client, pull));
    }

    let subject_owned = subject.to_string();
    let producer_w = w.clone();
    let producer_task = move |js: jetstream::Context, ids| {
        let (subject, w) = (subject_owned.clone(), producer_w.clone());
        async move {
            pipeline(ids, w.inflight_per_producer, |id| {
                let (js, subject, body) = (js.clone(), subject.clone(), Bytes::from(w.body(id)));
                async move {
                    let ack = js.publish(subject, body).await?;
                    Ok::<_, anyhow::Error>(async move {
                        ack.await?;
                        Ok(())
                    })
                }
            })
            .await
        }
    };

    let consumer_task = |(client, pull): (async_nats::Client, consumer::PullConsumer),
                         tally: Arc<Tally>,
                         stop: watch::Receiver<bool>| async move {
        consume(&pull, &tally, stop).await?;
        // Acks are fire-and-forget publishes: make sure the last ones left this client.
        client.flush().await.context("flushing a consumer's acks")
    };

    drive(
        "nats",
        w,
        producers,
        producer_task,
        consumers,
        consumer_task,
    )
    .await
}

async fn consume(
    pull: &consumer::PullConsumer,
    tally: &Tally,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    // Run until told to stop, like every consumer, so none closes while others still ack.
    while !*stop.borrow() {
        let mut batch = pull
            .batch()
            .max_messages(FETCH_BATCH)
            .expires(Duration::from_millis(FETCH_EXPIRES_MS))
            .messages()
            .await
            .context("requesting a batch")?;
        loop {
            let message = tokio::select! {
                _ = stop.changed() => return Ok(()),
                message = batch.next() => message,
            };
            let Some(message) = message else { break };
            let message = message
                .map_err(|e| anyhow!(e))
                .context("receiving a message")?;
            let id = message_id(&message.payload)?;
            let redelivered = message
                .info()
                .map_err(|e| anyhow!(e))
                .context("reading the delivery info")?
                .delivered
                > 1;
            message
                .ack()
                .await
                .map_err(|e| anyhow!(e))
                .with_context(|| format!("acking message {id}"))?;
            tally.record(id, redelivered)?;
        }
    }
    Ok(())
}
