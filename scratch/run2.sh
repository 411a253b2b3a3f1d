set -e
ip link set lo up
R=/tmp/ray-venv/bin
$R/ray start --head --node-ip-address 127.0.0.1 --port 6391 --num-cpus 2 --resources '{"node_a": 1}' --disable-usage-stats --include-dashboard false > /tmp/spike/head.log 2>&1
$R/ray start --address 127.0.0.1:6391 --node-ip-address 127.0.0.1 --num-cpus 2 --resources '{"node_b": 1}' --disable-usage-stats > /tmp/spike/worker.log 2>&1
timeout 120 $R/python /tmp/spike/engine_driver.py 127.0.0.1:6391 /tmp/tiny.gguf 2>/tmp/spike/driver.err || echo "driver failed $?"
$R/ray stop --force > /dev/null 2>&1
