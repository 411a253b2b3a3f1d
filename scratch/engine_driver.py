import asyncio, json, sys, time, os, signal
import anyio

async def main(address, model):
    from llamatelemetry_async import AsyncEngine, ServerConfig, ServerCrashedError
    from llamatelemetry_async.cluster import ray_servers
    placement = ray_servers(2, gpus_per_server=0, resources=[{"node_a": 0.01}, {"node_b": 0.01}], address=address)
    t0 = time.time()
    async with AsyncEngine(model, placement=placement, server=ServerConfig(n_parallel=2, ctx_size=2048)) as engine:
        out = {"start_s": round(time.time() - t0, 2)}
        out["servers"] = [(s.name, s.state, s.node is not None, s.url) for s in engine.servers]
        async def one(i):
            async with engine.stream_chat([{"role": "user", "content": f"hi {i}"}], max_tokens=6, temperature=0) as s:
                return "".join([c.text async for c in s])
        texts = []
        async with anyio.create_task_group() as tg:
            for i in range(8):
                async def run(i=i): texts.append(await one(i))
                tg.start_soon(run)
        out["streams"] = len(texts)
        out["served"] = [s.served for s in engine.servers]
        out["nodes_distinct"] = len({s.node for s in engine.servers})
        # kill one server's actor mid-stream
        victim = engine.servers[0]
        import ray
        async def long():
            try:
                async with engine.stream_chat([{"role": "user", "content": "x"}], max_tokens=1500, ignore_eos=True) as s:
                    async for _ in s: pass
                return "finished"
            except ServerCrashedError as e:
                return "crashed"
            except Exception as e:
                return type(e).__name__ + ": " + str(e)[:100]
        results = []
        async with anyio.create_task_group() as tg:
            async def run(): results.append(await long())
            tg.start_soon(run); tg.start_soon(run)
            await anyio.sleep(0.5)
            os.kill(victim.pid, signal.SIGKILL)  # the llama-server: the actor exits, Ray restarts it
        out["mid_stream"] = sorted(results)
        t1 = time.time()
        while engine.servers[0].state != "ready" or engine.servers[0].starts < 2:
            await anyio.sleep(0.1)
            if time.time() - t1 > 40: break
        out["restarted"] = [engine.servers[0].state, engine.servers[0].starts, round(time.time() - t1, 2)]
        r = await engine.chat([{"role": "user", "content": "after"}], max_tokens=3)
        out["after"] = r.usage.completion_tokens
    print(json.dumps(out))

anyio.run(main, sys.argv[1], sys.argv[2])
