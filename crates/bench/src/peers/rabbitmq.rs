//! RabbitMQ over AMQP 0-9-1 (lapin): a durable quorum queue, publisher confirms, persistent
//! messages; consumers with a prefetch window and manual acks. One connection per producer and
//! per consumer, as independent clients would have. Over TLS (`amqps://`, rustls with ring,
//! trusting the given CA only) for `rabbitmq-tls`.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::watch;

use super::{drive, message_id, pipeline, unique_suffix, Report, Tally, Workload};

/// Unacked deliveries each consumer may hold; also bounds lapin's per-consumer buffer.
const PREFETCH: u16 = 256;
/// AMQP basic.properties delivery-mode for persistent messages.
const DELIVERY_MODE_PERSISTENT: u8 = 2;
const REPLY_SUCCESS: u16 = 200;

pub async fn run_rabbitmq(url: &str, ca_pem: Option<String>, w: &Workload) -> Result<Report> {
    let queue = format!("keel-bench-{}", unique_suffix()?);
    let tls = lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain: ca_pem,
    };
    let admin = connect(url, &tls).await?;
    let admin_channel = admin.create_channel().await.context("admin channel")?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    admin_channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .with_context(|| format!("declaring quorum queue {queue}"))?;

    let result = measure(url, &tls, &queue, w).await;
    // Delete the queue even after a failed run so runs do not pile up on the broker.
    let deleted = admin_channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .with_context(|| format!("deleting queue {queue}"));
    let closed = admin
        .close(REPLY_SUCCESS, "OK".into())
        .await
        .context("closing the admin connection");
    let report = result?;
    deleted?;
    closed?;
    Ok(report)
}

async fn connect(url: &str, tls: &lapin::tcp::OwnedTLSConfig) -> Result<Connection> {
    let runtime = lapin::runtime::default_runtime().context("lapin's runtime")?;
    Connection::connect_with_config(url, ConnectionProperties::default(), tls.clone(), runtime)
        .await
        .context("connecting")
}

async fn measure(
    url: &str,
    tls: &lapin::tcp::OwnedTLSConfig,
    queue: &str,
    w: &Workload,
) -> Result<Report> {
    let mut producers = Vec::with_capacity(w.producers);
    for index in 0..w.producers {
        let connection = connect(url, tls)
            .await
            .with_context(|| format!("producer {index}"))?;
        let channel = connection
            .create_channel()
            .await
            .context("producer channel")?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("enabling publisher confirms")?;
        producers.push((connection, channel));
    }
    let mut consumers = Vec::with_capacity(w.consumers);
    for index in 0..w.consumers {
        let connection = connect(url, tls)
            .await
            .with_context(|| format!("consumer {index}"))?;
        let channel = connection
            .create_channel()
            .await
            .context("consumer channel")?;
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .context("setting the prefetch")?;
        consumers.push((index, connection, channel));
    }

    let queue_owned = queue.to_string();
    let producer_w = w.clone();
    let producer_task = move |(connection, channel): (Connection, Channel), ids| {
        let (queue, w) = (queue_owned.clone(), producer_w.clone());
        async move {
            let latencies = pipeline(ids, w.inflight_per_producer, |id| {
                let (channel, queue, body) = (channel.clone(), queue.clone(), w.body(id));
                async move {
                    let confirm = channel
                        .basic_publish(
                            "".into(),
                            queue.into(),
                            BasicPublishOptions::default(),
                            &body,
                            BasicProperties::default().with_delivery_mode(DELIVERY_MODE_PERSISTENT),
                        )
                        .await?;
                    Ok::<_, anyhow::Error>(async move {
                        let confirmation = confirm.await?;
                        if !confirmation.is_ack() {
                            bail!("broker did not confirm the message: {confirmation:?}");
                        }
                        Ok(())
                    })
                }
            })
            .await?;
            connection
                .close(REPLY_SUCCESS, "OK".into())
                .await
                .context("closing a producer connection")?;
            Ok(latencies)
        }
    };

    let queue_owned = queue.to_string();
    let consumer_task = move |(index, connection, channel): (usize, Connection, Channel),
                              tally: Arc<Tally>,
                              stop: watch::Receiver<bool>| {
        let queue = queue_owned.clone();
        async move {
            consume(&queue, index, &channel, &tally, stop).await?;
            connection
                .close(REPLY_SUCCESS, "OK".into())
                .await
                .context("closing a consumer connection")
        }
    };

    drive(
        if tls.cert_chain.is_some() {
            "rabbitmq-tls"
        } else {
            "rabbitmq"
        },
        w,
        producers,
        producer_task,
        consumers,
        consumer_task,
    )
    .await
}

async fn consume(
    queue: &str,
    index: usize,
    channel: &Channel,
    tally: &Tally,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut deliveries = channel
        .basic_consume(
            queue.into(),
            format!("keel-bench-consumer-{index}").into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("consuming from {queue}"))?;
    // Run until told to stop, not until the tally is complete: when a consumer closed its
    // connection right after its last acks, the broker requeued some of those already-acked
    // messages (seen: 3 of 500) and the others received and counted them again.
    loop {
        let delivery = tokio::select! {
            _ = stop.changed() => return Ok(()),
            delivery = deliveries.next() => delivery,
        };
        let delivery = delivery
            .context("the broker cancelled the consumer")?
            .context("receiving a delivery")?;
        let id = message_id(&delivery.data)?;
        delivery
            .ack(BasicAckOptions::default())
            .await
            .with_context(|| format!("acking message {id}"))?;
        tally.record(id, delivery.redelivered)?;
    }
}
