//! The mirror's Kafka client against a real Kafka-protocol broker (Tansu),
//! checked with the reference client (confluent-kafka). See
//! tests/upstream/mod.rs for how they are installed and found.

mod upstream;

use std::time::Duration;

use skiff::mirror::kafka::{
    BatchBuilder, Compression, ErrorCode, HeaderRef, Isolation, KafkaClient, KafkaConfig,
    KafkaError, LinkError, NewTopic, OffsetSpec, PartitionReader, Producer, ProducerConfig,
    RecordRef, SaslConfig, SaslMechanism, StateError, TlsConfig,
};
use upstream::proxy::Proxy;
use upstream::{free_port, pki, reference_consume, reference_produce, RefRecord, Tansu};

fn config(bootstrap: &str) -> KafkaConfig {
    let mut config = KafkaConfig::new(bootstrap).expect("bootstrap");
    config.request_timeout = Duration::from_secs(5);
    config.connect_timeout = Duration::from_secs(5);
    config
}

fn client(bootstrap: &str) -> KafkaClient {
    KafkaClient::new(config(bootstrap)).expect("client")
}

async fn create(client: &KafkaClient, topic: &str, partitions: i32) {
    let created = client
        .create_topic(&NewTopic {
            name: topic.to_owned(),
            partitions,
            replication_factor: -1,
            configs: vec![],
        })
        .await
        .expect("create topic");
    assert!(created, "{topic} existed already");
}

/// `n` records `prefix-i`, keyed `key-i`, with two headers each and
/// timestamps 1_700_000_000_000 + i.
fn batch(prefix: &str, n: usize) -> BatchBuilder {
    let mut b = BatchBuilder::new();
    for i in 0..n {
        let key = format!("key-{i}");
        let value = format!("{prefix}-{i}");
        let index = i.to_string();
        let headers = [
            HeaderRef {
                key: "skiff.offset",
                value: Some(index.as_bytes()),
            },
            HeaderRef {
                key: "empty",
                value: None,
            },
        ];
        b.push(&RecordRef {
            key: Some(key.as_bytes()),
            value: Some(value.as_bytes()),
            timestamp_ms: 1_700_000_000_000 + i as i64,
            headers: &headers,
        })
        .expect("push");
    }
    b
}

fn values(records: &[RefRecord]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8(r.value.clone().unwrap_or_default()).unwrap())
        .collect()
}

fn expected(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

#[test]
fn metadata_leaders_topics_and_offsets() {
    let tansu = Tansu::start();
    smol::block_on(async {
        let client = client(&tansu.addr());
        create(&client, "meta", 3).await;
        let again = client
            .create_topic(&NewTopic {
                name: "meta".into(),
                partitions: 3,
                replication_factor: -1,
                configs: vec![],
            })
            .await
            .unwrap();
        assert!(!again, "a second create reports the topic exists");
        assert_eq!(client.partition_count("meta").await.unwrap(), 3);
        for p in 0..3 {
            for spec in [OffsetSpec::Earliest, OffsetSpec::Latest] {
                let offset = client
                    .list_offset("meta", p, spec, Isolation::ReadUncommitted)
                    .await
                    .unwrap();
                assert_eq!(offset, 0, "partition {p} {spec:?}");
            }
        }
        let e = client.partition_count("no-such-topic").await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION), "{e}");
        let e = client
            .list_offset("meta", 7, OffsetSpec::Latest, Isolation::ReadUncommitted)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION), "{e}");

        // The compacted checkpoint topic the mirror creates.
        let created = client
            .create_topic(&NewTopic {
                name: "checkpoints".into(),
                partitions: 1,
                replication_factor: -1,
                configs: vec![("cleanup.policy".into(), "compact".into())],
            })
            .await
            .unwrap();
        assert!(created);
    });
}

#[test]
fn idempotent_produce_in_each_codec_reads_back_intact() {
    let tansu = Tansu::start();
    let bootstrap = tansu.addr();
    smol::block_on(async {
        let client = client(&bootstrap);
        for (partition, compression) in [Compression::None, Compression::Lz4, Compression::Zstd]
            .into_iter()
            .enumerate()
        {
            let topic = format!("codec-{compression:?}").to_lowercase();
            create(&client, &topic, 2).await;
            let mut producer = Producer::new(
                client.clone(),
                ProducerConfig {
                    compression,
                    ..ProducerConfig::default()
                },
            );
            let identity = producer.init().await.expect("init");
            assert!(identity.producer_id >= 0);
            let partition = partition as i32 % 2;
            let first = producer
                .produce(&topic, partition, &batch("a", 5))
                .await
                .expect("produce");
            assert_eq!(first.base_offset, Some(0));
            // Two pipelined sends, answered in order.
            let s1 = producer
                .send(&topic, partition, &batch("b", 3))
                .await
                .unwrap();
            let s2 = producer
                .send(&topic, partition, &batch("c", 2))
                .await
                .unwrap();
            let (a1, a2) = (s1.wait().await.unwrap(), s2.wait().await.unwrap());
            assert!(a1.base_offset.unwrap() < a2.base_offset.unwrap());

            // Our own reader.
            let mut reader = PartitionReader::new(client.clone(), &topic, partition, 0);
            let ours = reader.read_to_end().await.unwrap();
            let ours: Vec<String> = ours
                .iter()
                .map(|r| String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap())
                .collect();
            let mut want = expected("a", 5);
            want.extend(expected("b", 3));
            want.extend(expected("c", 2));
            assert_eq!(ours, want, "{compression:?}, our reader");

            // The reference reader: keys, values, headers, timestamps.
            let theirs = reference_consume(&bootstrap, &topic, &[partition], false, 10);
            assert_eq!(values(&theirs), want, "{compression:?}, reference");
            let r = &theirs[3];
            assert_eq!(r.key.as_deref(), Some(&b"key-3"[..]));
            assert_eq!(r.timestamp, 1_700_000_000_003);
            assert_eq!(
                r.headers,
                vec![
                    ("skiff.offset".to_owned(), Some(b"3".to_vec())),
                    ("empty".to_owned(), None)
                ]
            );
            let offsets: Vec<i64> = theirs.iter().map(|r| r.offset).collect();
            assert_eq!(offsets, (0..10).collect::<Vec<_>>());
        }
    });
}

#[test]
fn batches_from_the_reference_producer_decode_in_each_codec() {
    let tansu = Tansu::start();
    let bootstrap = tansu.addr();
    smol::block_on(async {
        let client = client(&bootstrap);
        for codec in ["none", "lz4", "zstd"] {
            let topic = format!("ref-{codec}");
            create(&client, &topic, 1).await;
            reference_produce(&bootstrap, &topic, 0, codec, 50);
            let fetched = client
                .fetch(
                    &topic,
                    0,
                    0,
                    1 << 20,
                    Duration::from_millis(500),
                    Isolation::ReadUncommitted,
                )
                .await
                .expect("fetch");
            let records: Vec<_> = fetched.batches.iter().flat_map(|b| &b.records).collect();
            assert_eq!(records.len(), 50, "{codec}");
            let wanted_codec = match codec {
                "none" => 0,
                "lz4" => 3,
                _ => 4,
            };
            assert!(
                fetched.batches.iter().all(|b| b.codec == wanted_codec),
                "{codec}"
            );
            for (i, r) in records.iter().enumerate() {
                assert_eq!(r.offset, i as i64);
                assert_eq!(r.key.as_deref(), Some(format!("k{i}").as_bytes()));
                assert_eq!(
                    r.value.as_deref(),
                    Some(format!("v{i}").repeat(20).as_bytes())
                );
                assert_eq!(r.timestamp_ms, 1_700_000_000_000 + i as i64);
                assert_eq!(r.headers.len(), 1);
                assert_eq!(r.headers[0].key, "h");
                assert_eq!(
                    r.headers[0].value.as_deref(),
                    Some(i.to_string().as_bytes())
                );
            }
        }
    });
}

fn transactional(client: &KafkaClient, id: &str) -> Producer {
    Producer::new(
        client.clone(),
        ProducerConfig {
            transactional_id: Some(id.to_owned()),
            compression: Compression::Lz4,
            ..ProducerConfig::default()
        },
    )
}

async fn committed(client: &KafkaClient, topic: &str, partition: i32) -> Vec<String> {
    let mut reader = PartitionReader::new(client.clone(), topic, partition, 0);
    reader
        .read_to_end()
        .await
        .expect("read")
        .iter()
        .map(|r| String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap())
        .collect()
}

#[test]
fn committed_and_aborted_transactions() {
    let tansu = Tansu::start();
    let bootstrap = tansu.addr();
    smol::block_on(async {
        let client = client(&bootstrap);
        create(&client, "txn", 2).await;
        let mut producer = transactional(&client, "gw-txn");
        producer.init().await.expect("init");

        producer.begin().unwrap();
        producer.produce("txn", 0, &batch("one", 3)).await.unwrap();
        producer
            .produce("txn", 1, &batch("one-p1", 2))
            .await
            .unwrap();
        producer.commit().await.expect("commit");

        producer.begin().unwrap();
        producer.produce("txn", 0, &batch("two", 4)).await.unwrap();
        producer.abort().await.expect("abort");

        producer.begin().unwrap();
        producer
            .produce("txn", 0, &batch("three", 2))
            .await
            .unwrap();
        producer.commit().await.expect("commit");

        // An empty transaction never reaches the coordinator.
        producer.begin().unwrap();
        producer.commit().await.unwrap();

        let mut want = expected("one", 3);
        want.extend(expected("three", 2));
        assert_eq!(
            committed(&client, "txn", 0).await,
            want,
            "our read_committed reader"
        );
        assert_eq!(committed(&client, "txn", 1).await, expected("one-p1", 2));

        // The reference reader sees every data record, markers skipped
        // (Tansu sends no aborted-transaction list, so librdkafka's
        // read_committed would show the aborted ones too).
        let all = reference_consume(&bootstrap, "txn", &[0], false, 9);
        let mut everything = expected("one", 3);
        everything.extend(expected("two", 4));
        everything.extend(expected("three", 2));
        assert_eq!(values(&all), everything, "reference, read_uncommitted");
        // Three data batches and three markers: the offsets show the gaps.
        let offsets: Vec<i64> = all.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, vec![0, 1, 2, 4, 5, 6, 7, 9, 10]);
        let committed_view = reference_consume(&bootstrap, "txn", &[0], true, 9);
        for v in &want {
            assert!(
                values(&committed_view).contains(v),
                "reference read_committed lacks {v}"
            );
        }
    });
}

#[test]
fn a_second_producer_with_the_same_id_fences_the_first() {
    let tansu = Tansu::start();
    let bootstrap = tansu.addr();
    smol::block_on(async {
        create(&client(&bootstrap), "fence", 1).await;
        // Separate clients: separate connections, like two gateways.
        let first_client = client(&bootstrap);
        let mut first = transactional(&first_client, "gw-fence");
        let old = first.init().await.unwrap();
        first.begin().unwrap();
        first.produce("fence", 0, &batch("old", 2)).await.unwrap();

        let second_client = client(&bootstrap);
        let mut second = transactional(&second_client, "gw-fence");
        let new = second.init().await.unwrap();
        assert!(
            (new.producer_id, new.epoch) != (old.producer_id, old.epoch),
            "a new epoch: {old:?} then {new:?}"
        );

        // Kafka answers PRODUCER_FENCED / INVALID_PRODUCER_EPOCH; Tansu
        // closes the connection, which is an unknown outcome. Either way
        // the first producer must initialise again before anything else.
        let e = first.commit().await.unwrap_err();
        eprintln!("commit after fencing: {e}");
        assert!(e.is_fenced() || e.is_outcome_unknown(), "{e}");
        let e = first
            .produce("fence", 0, &batch("late", 1))
            .await
            .unwrap_err();
        assert!(matches!(e, KafkaError::State(StateError::NeedsInit)), "{e}");

        second.begin().unwrap();
        second.produce("fence", 0, &batch("new", 2)).await.unwrap();
        second.commit().await.unwrap();
        assert_eq!(
            committed(&second_client, "fence", 0).await,
            expected("new", 2)
        );
    });
}

#[test]
fn fenced_produce_is_a_typed_error() {
    let tansu = Tansu::start();
    let bootstrap = tansu.addr();
    smol::block_on(async {
        create(&client(&bootstrap), "fence2", 1).await;
        let first_client = client(&bootstrap);
        let mut first = transactional(&first_client, "gw-fence2");
        first.init().await.unwrap();
        first.begin().unwrap();
        first.produce("fence2", 0, &batch("old", 1)).await.unwrap();
        let mut second = transactional(&client(&bootstrap), "gw-fence2");
        second.init().await.unwrap();
        // The partition is in the first's transaction already: this goes
        // straight to the leader with the old epoch.
        let e = first
            .produce("fence2", 0, &batch("old", 1))
            .await
            .unwrap_err();
        eprintln!("produce after fencing: {e}");
        assert!(e.is_fenced() || e.is_outcome_unknown(), "{e}");
        assert!(first.begin().is_err());
    });
}

/// Tansu listens on one port and advertises the proxy's: every
/// connection of the client goes through the proxy.
fn behind_proxy() -> (Tansu, Proxy) {
    let tansu_port = free_port();
    let proxy = Proxy::start(0, &format!("127.0.0.1:{tansu_port}"));
    let tansu = Tansu::start_with(tansu_port, proxy.port, &[]);
    (tansu, proxy)
}

#[test]
fn a_produce_whose_answer_is_lost_is_an_unknown_outcome() {
    let (tansu, proxy) = behind_proxy();
    smol::block_on(async {
        let client = client(&tansu.advertised_addr());
        create(&client, "cut", 1).await;
        let mut producer = transactional(&client, "gw-cut");
        producer.init().await.unwrap();
        producer.begin().unwrap();
        producer
            .produce("cut", 0, &batch("before", 2))
            .await
            .unwrap();

        proxy.cut_after_next_request();
        let e = producer
            .produce("cut", 0, &batch("lost", 3))
            .await
            .unwrap_err();
        assert!(e.is_outcome_unknown(), "{e}");
        assert!(matches!(
            e,
            KafkaError::OutcomeUnknown {
                api: "Produce",
                cause: LinkError::Closed | LinkError::Io(_)
            }
        ));
        // Never resent: the producer insists on a new epoch.
        let e = producer.commit().await.unwrap_err();
        assert!(matches!(e, KafkaError::State(StateError::NeedsInit)), "{e}");

        // Re-initialising aborts the open transaction (KIP-98): what it
        // wrote, including the batch whose answer was lost, never shows.
        producer.init().await.unwrap();
        producer.begin().unwrap();
        producer
            .produce("cut", 0, &batch("after", 2))
            .await
            .unwrap();
        producer.commit().await.unwrap();
        assert_eq!(committed(&client, "cut", 0).await, expected("after", 2));
    });
}

#[test]
fn a_commit_whose_answer_is_lost_is_an_unknown_outcome() {
    let (tansu, proxy) = behind_proxy();
    smol::block_on(async {
        let client = client(&tansu.advertised_addr());
        create(&client, "cut-commit", 1).await;
        let mut producer = transactional(&client, "gw-cut-commit");
        producer.init().await.unwrap();
        producer.begin().unwrap();
        producer
            .produce("cut-commit", 0, &batch("maybe", 3))
            .await
            .unwrap();
        proxy.cut_after_next_request();
        let e = producer.commit().await.unwrap_err();
        assert!(
            matches!(e, KafkaError::OutcomeUnknown { api: "EndTxn", .. }),
            "{e}"
        );
        producer.init().await.unwrap();
        // The commit reached the coordinator before the cut: whether it
        // took effect is for the caller to find out by reading (the
        // mirror reads its checkpoint); all or nothing, never a part.
        let seen = committed(&client, "cut-commit", 0).await;
        assert!(seen.is_empty() || seen == expected("maybe", 3), "{seen:?}");
    });
}

#[test]
fn a_stalled_link_times_out_and_a_slow_one_still_works() {
    let (tansu, proxy) = behind_proxy();
    smol::block_on(async {
        let mut config = config(&tansu.advertised_addr());
        config.request_timeout = Duration::from_secs(1);
        let client = KafkaClient::new(config).unwrap();
        create(&client, "stall", 1).await;
        let mut producer = Producer::new(client.clone(), ProducerConfig::default());
        producer.init().await.unwrap();
        producer.produce("stall", 0, &batch("ok", 1)).await.unwrap();

        proxy.stall();
        let e = producer
            .produce("stall", 0, &batch("stalled", 1))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                KafkaError::OutcomeUnknown {
                    cause: LinkError::Timeout,
                    ..
                }
            ),
            "{e}"
        );
        proxy.resume();

        proxy.set_delay(Duration::from_millis(100));
        producer.init().await.unwrap();
        producer
            .produce("stall", 0, &batch("slow", 2))
            .await
            .unwrap();
        proxy.set_delay(Duration::ZERO);

        // The stalled batch may have been written (its answer is what was
        // lost): nothing is resent, so it is there at most once.
        let all = committed(&client, "stall", 0).await;
        assert_eq!(all.first().map(String::as_str), Some("ok-0"));
        assert!(all.ends_with(&expected("slow", 2)), "{all:?}");
        assert!(all.len() <= 4, "{all:?}");
    });
}

#[test]
fn a_dead_link_fails_fast_and_recovers() {
    let (tansu, proxy) = behind_proxy();
    smol::block_on(async {
        let client = client(&tansu.advertised_addr());
        create(&client, "down", 1).await;
        proxy.down();
        let e = client.partition_count("other").await.unwrap_err();
        assert!(
            matches!(
                e,
                KafkaError::Connect { .. } | KafkaError::OutcomeUnknown { .. }
            ),
            "{e}"
        );
        proxy.up();
        assert_eq!(client.partition_count("down").await.unwrap(), 1);
    });
}

#[test]
fn unreachable_brokers_are_named() {
    let port = free_port();
    smol::block_on(async {
        let client = client(&format!("127.0.0.1:{port}"));
        match client.partition_count("t").await {
            Err(KafkaError::Connect { addr, .. }) => assert_eq!(addr, format!("127.0.0.1:{port}")),
            other => panic!("{other:?}"),
        }
        let client = client_for_unknown_host();
        let e = client.partition_count("t").await.unwrap_err();
        assert!(matches!(e, KafkaError::Connect { .. }), "{e}");
        assert!(e.to_string().contains("no-such-host.invalid:9092"), "{e}");
    });
}

fn client_for_unknown_host() -> KafkaClient {
    client("no-such-host.invalid:9092")
}

#[test]
fn refused_sasl_is_an_auth_error() {
    let port = free_port();
    let tansu = Tansu::start_with(port, port, &["--authentication"]);
    smol::block_on(async {
        for mechanism in [SaslMechanism::ScramSha256, SaslMechanism::ScramSha512] {
            let mut config = config(&tansu.addr());
            config.sasl = Some(SaslConfig {
                mechanism,
                username: "nobody".into(),
                password: "wrong".into(),
            });
            let client = KafkaClient::new(config).unwrap();
            let e = client.partition_count("t").await.unwrap_err();
            assert!(matches!(e, KafkaError::Auth { .. }), "{mechanism:?}: {e}");
            // The server's own reason (RFC 5802's e=), passed through.
            assert!(e.to_string().contains("unknown-user"), "{e}");
        }
        // Without SASL the broker drops the connection at the first
        // request that needs authentication.
        let e = client(&tansu.addr())
            .partition_count("t")
            .await
            .unwrap_err();
        eprintln!("without SASL: {e}");
        assert!(
            matches!(
                e,
                KafkaError::Connect { .. } | KafkaError::OutcomeUnknown { .. }
            ),
            "{e}"
        );
    });
}

#[test]
fn tls_with_a_ca_file_and_a_client_certificate() {
    let ours = pki(true);
    let tansu_port = free_port();
    let proxy = Proxy::start_tls(0, &format!("127.0.0.1:{tansu_port}"), ours.server.clone());
    let proxy_port = proxy.port;
    let _tansu = Tansu::start_with(tansu_port, proxy_port, &[]);
    let bootstrap = format!("127.0.0.1:{proxy_port}");
    let other = pki(false);
    // A client trusting `ca`, with our client certificate or without.
    let tls_client = |ca: &std::path::Path, with_cert: bool| {
        let mut config = config(&bootstrap);
        config.tls = Some(TlsConfig {
            ca_file: Some(ca.to_owned()),
            cert_file: with_cert.then(|| ours.dir.path().join("client.pem")),
            key_file: with_cert.then(|| ours.dir.path().join("client.key")),
            server_name: None,
        });
        KafkaClient::new(config).unwrap()
    };
    let ca = ours.dir.path().join("ca.pem");
    smol::block_on(async {
        let client = tls_client(&ca, true);
        create(&client, "tls", 1).await;
        let mut producer = transactional(&client, "gw-tls");
        producer.init().await.unwrap();
        producer.begin().unwrap();
        producer
            .produce("tls", 0, &batch("secure", 3))
            .await
            .unwrap();
        producer.commit().await.unwrap();
        assert_eq!(committed(&client, "tls", 0).await, expected("secure", 3));

        // Without the client certificate the server refuses the handshake.
        let e = tls_client(&ca, false)
            .partition_count("tls")
            .await
            .unwrap_err();
        assert!(matches!(e, KafkaError::Connect { .. }), "{e}");

        // A CA that did not sign the server: not trusted.
        let e = tls_client(&other.dir.path().join("ca.pem"), true)
            .partition_count("tls")
            .await
            .unwrap_err();
        assert!(matches!(e, KafkaError::Connect { .. }), "{e}");
        assert!(e.to_string().contains("TLS"), "{e}");
    });
}
