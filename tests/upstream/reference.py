"""The reference Kafka client (confluent-kafka, i.e. librdkafka) for the
tests: reads what skiff wrote upstream, and writes batches skiff must read.

  reference.py consume BOOTSTRAP TOPIC PARTITIONS ISOLATION EXPECT [IDLE_S]
      Reads PARTITIONS (comma separated) from the beginning with assign()
      (subscribe() does not deliver from Tansu), until EXPECT records came
      or none came for IDLE_S seconds (default 3). Prints one JSON object
      per record: partition, offset, timestamp, key, value, headers; bytes
      as hex, null as null.

  reference.py produce BOOTSTRAP TOPIC PARTITION COMPRESSION COUNT
      Writes COUNT records with the idempotent producer (acks=all) to one
      partition: key k<i>, value v<i> repeated, header h=<i>, timestamp
      1700000000000 + i. Prints the number delivered.
"""
import json
import sys
import time

from confluent_kafka import Consumer, Producer, TopicPartition


def hexed(b):
    return None if b is None else b.hex()


def consume(bootstrap, topic, partitions, isolation, expect, idle_s=3.0):
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": "skiff-reference",
        "enable.auto.commit": False,
        "isolation.level": isolation,
        "enable.partition.eof": False,
    })
    consumer.assign([TopicPartition(topic, int(p), 0) for p in partitions.split(",")])
    seen = 0
    last = time.monotonic()
    while seen < expect and time.monotonic() - last < idle_s:
        msg = consumer.poll(0.2)
        if msg is None:
            continue
        if msg.error():
            print(json.dumps({"error": str(msg.error())}), flush=True)
            continue
        last = time.monotonic()
        seen += 1
        print(json.dumps({
            "partition": msg.partition(),
            "offset": msg.offset(),
            "timestamp": msg.timestamp()[1],
            "key": hexed(msg.key()),
            "value": hexed(msg.value()),
            "headers": [[k, hexed(v)] for k, v in (msg.headers() or [])],
        }), flush=True)
    consumer.close()


def produce(bootstrap, topic, partition, compression, count):
    producer = Producer({
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "compression.type": compression,
        "linger.ms": 50,
    })
    delivered = []

    def on_delivery(err, _msg):
        if err is None:
            delivered.append(1)
        else:
            print(json.dumps({"error": str(err)}), file=sys.stderr, flush=True)

    for i in range(count):
        producer.produce(
            topic,
            key=b"k%d" % i,
            value=b"v%d" % i * 20,
            partition=partition,
            headers=[("h", str(i).encode())],
            timestamp=1700000000000 + i,
            on_delivery=on_delivery,
        )
    producer.flush(30)
    print(len(delivered), flush=True)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "consume":
        consume(args[0], args[1], args[2], args[3], int(args[4]), *(float(a) for a in args[5:]))
    elif cmd == "produce":
        produce(args[0], args[1], int(args[2]), args[3], int(args[4]))
    else:
        sys.exit("unknown command " + cmd)
