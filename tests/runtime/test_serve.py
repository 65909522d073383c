"""`clipfuse serve` / `clipfuse.connect`: a real Triton server (pytriton) on 127.0.0.1 serving the tiny engine.

Predictions through the server (HTTP and gRPC, API and CLI) equal local ones; a bounded concurrent load
completes without errors and Triton's statistics show batches above 1; malformed requests get error
responses and the server keeps serving; health, readiness and metrics answer.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import clipfuse
from clipfuse.cli.main import cli
from clipfuse.core.errors import ClipfuseError
from clipfuse.runtime.preprocess import preprocess_for_inputs
from clipfuse.runtime.serving.server import check_serving_environment, free_port

try:
    check_serving_environment()
except ClipfuseError as e:      # not installed, or numpy 2 (pytriton 0.7.0's stub then serves empty outputs)
    pytest.skip(f"serving needs the `serve` extra with numpy<2: {e}", allow_module_level=True)

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

HOST = "127.0.0.1"          # loopback only, always
QUEUE_DELAY_US = 20_000     # long enough that concurrent single-image requests meet in one batch
MAX_BATCH = 8


@pytest.fixture(scope="module")
def server(tiny_engine):
    srv = clipfuse.serve(tiny_engine, host=HOST, http_port=free_port(), grpc_port=free_port(),
                         metrics_port=free_port(), max_batch=MAX_BATCH, queue_delay_us=QUEUE_DELAY_US,
                         exit_timeout_s=2)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def local(tiny_engine):
    with clipfuse.load(tiny_engine, backend="onnxruntime") as p:
        yield p


def get(url, headers=None, timeout=10):
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
        return r.status, r.read()


def stats(server) -> dict:
    _, body = get(f"{server.http_url}/v2/models/{server.model_name}/stats", server.headers)
    return json.loads(body)["model_stats"][0]


def assert_same(remote, local_preds):
    assert [p.labels for p in remote] == [p.labels for p in local_preds]
    np.testing.assert_allclose([p.probs for p in remote], [p.probs for p in local_preds], rtol=1e-5, atol=1e-7)
    for r, lo in zip(remote, local_preds):
        assert r.temperatures.keys() == lo.temperatures.keys()
        np.testing.assert_allclose(list(r.temperatures.values()), list(lo.temperatures.values()), rtol=1e-5)
        assert (r.path, r.index, r.error) == (lo.path, lo.index, lo.error)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_predictions_through_the_server_equal_local(protocol, server, local, photo_paths):
    url = server.http_url if protocol == "http" else server.grpc_url
    with clipfuse.connect(url, model=server.model_name) as remote:
        assert remote.classes == local.classes and remote.backbone_names == local.backbone_names
        assert_same(remote.predict(photo_paths, top_k=3), local.predict(photo_paths, top_k=3))
        feed = {name: np.stack([v] * 2)
                for name, v in preprocess_for_inputs(Image.open(photo_paths[0]), local.specs).items()}
        got, want = remote.predict_arrays(feed), local.predict_arrays(feed)
        assert list(got) == list(want)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_cli_predict_url_matches_local(server, tiny_engine, photo_paths):
    runner = CliRunner()
    base = ["predict", "--format", "jsonl", "-k", "4"]
    loc = runner.invoke(cli, base + ["--backend", "onnxruntime", str(tiny_engine)] + [str(p) for p in photo_paths])
    # ENGINE omitted: the first argument is an image; the model is named with --model
    rem = runner.invoke(cli, base + ["--url", server.http_url, "--model", server.model_name]
                        + [str(p) for p in photo_paths])
    assert loc.exit_code == 0 and rem.exit_code == 0, rem.output
    lo, re = [json.loads(x) for x in loc.stdout.splitlines()], [json.loads(x) for x in rem.stdout.splitlines()]
    assert [r["labels"] for r in re] == [r["labels"] for r in lo] and [r["path"] for r in re] == [r["path"] for r in lo]
    np.testing.assert_allclose([r["probs"] for r in re], [r["probs"] for r in lo], rtol=1e-5, atol=1e-7)
    # an engine folder as ENGINE names the model; a server that is not there is a one-line error
    rem2 = runner.invoke(cli, base + ["--url", server.grpc_url, str(tiny_engine), str(photo_paths[0])])
    assert rem2.exit_code == 0 and json.loads(rem2.stdout)["labels"] == lo[0]["labels"]
    dead = runner.invoke(cli, ["predict", "--url", f"http://{HOST}:{free_port()}", str(photo_paths[0])])
    assert dead.exit_code == 1 and "no Triton server answers" in dead.stderr


def test_concurrent_load_has_no_errors_and_batches(server, local, photo_paths):
    """8 clients x 50 single-image requests; every answer checked; Triton's batch_stats show batches > 1."""
    feeds = [{k: v[None] for k, v in preprocess_for_inputs(Image.open(p), local.specs).items()} for p in photo_paths]
    want = [local.predict_arrays(f)["probs"] for f in feeds]
    before = stats(server)["inference_count"]

    def client(c: int) -> int:
        done = 0
        with httpclient.InferenceServerClient(f"{HOST}:{server.http_port}", network_timeout=30,
                                              connection_timeout=30) as tc:
            for i in range(50):
                k = (c + i) % len(feeds)
                inputs = []
                for name, arr in feeds[k].items():
                    x = httpclient.InferInput(name, list(arr.shape), "UINT8")
                    x.set_data_from_numpy(arr, binary_data=True)
                    inputs.append(x)
                res = tc.infer(server.model_name, inputs, outputs=[httpclient.InferRequestedOutput("probs")])
                np.testing.assert_allclose(res.as_numpy("probs"), want[k], rtol=1e-5, atol=1e-6)
                done += 1
        return done

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client, c) for c in range(8)]
        assert sum(f.result(timeout=120) for f in futures) == 400        # any error re-raises here
    s = stats(server)
    assert s["inference_count"] - before == 400
    assert s["inference_stats"]["fail"]["count"] == 0
    batched = {b["batch_size"]: b["compute_infer"]["count"] for b in s["batch_stats"] if b["batch_size"] > 1}
    assert batched and max(batched) <= MAX_BATCH, s["batch_stats"]     # dynamic batching formed batches > 1


def _raw_infer(server, arrays: dict, dtype: str):
    with httpclient.InferenceServerClient(f"{HOST}:{server.http_port}", network_timeout=30) as tc:
        inputs = []
        for name, arr in arrays.items():
            x = httpclient.InferInput(name, list(arr.shape), dtype)
            x.set_data_from_numpy(arr, binary_data=True)
            inputs.append(x)
        return tc.infer(server.model_name, inputs)


def test_malformed_requests_get_errors_and_the_server_keeps_serving(server, local, photo_paths, tmp_path):
    good = {i["name"]: np.zeros((1, 3, i["shape"][2], i["shape"][3]), np.uint8) for i in local.manifest.inputs}
    bad_dtype = {k: v.astype(np.float32) for k, v in good.items()}
    bad_shape = {k: v[:, :, :-1] for k, v in good.items()}
    notes = np.frombuffer(b"a shopping list, not a photo\n" * 3, np.uint8)
    not_an_image = {k: notes[None, :] for k in good}          # raw bytes where pixels belong
    missing = dict(list(good.items())[:1])
    for arrays, dtype in ((bad_dtype, "FP32"), (bad_shape, "UINT8"), (not_an_image, "UINT8"), (missing, "UINT8")):
        with pytest.raises(InferenceServerException):
            _raw_infer(server, arrays, dtype)
    # through the client: a file that is not an image fails alone, with its reason; the rest is classified
    notes_file = tmp_path / "notes.jpg"
    notes_file.write_text("a shopping list, not a photo\n")
    with clipfuse.connect(server.http_url, model=server.model_name) as remote:
        preds = remote.predict([photo_paths[0], notes_file, photo_paths[1]])
        assert [p.ok for p in preds] == [True, False, True] and "not an image" in preds[1].error
        assert_same([preds[0], preds[2]], [p for p in local.predict([photo_paths[0], notes_file, photo_paths[1]]) if p.ok])
        with pytest.raises(ClipfuseError, match="must be uint8"):
            remote.predict_arrays(bad_dtype)
    # still serving
    out = _raw_infer(server, good, "UINT8")
    np.testing.assert_allclose(out.as_numpy("probs"), local.predict_arrays(good)["probs"], rtol=1e-5, atol=1e-6)


def test_health_readiness_metrics_and_config(server):
    assert get(f"{server.http_url}/v2/health/live")[0] == 200
    assert get(f"{server.http_url}/v2/health/ready")[0] == 200
    assert get(f"{server.http_url}/v2/models/{server.model_name}/ready")[0] == 200
    with grpcclient.InferenceServerClient(f"{HOST}:{server.grpc_port}") as g:
        assert g.is_server_ready() and g.is_model_ready(server.model_name)
    _, body = get(server.metrics_url)
    assert f'nv_inference_request_success{{model="{server.model_name}"' in body.decode()
    # the statistics endpoint is token-protected (pytriton's default): without the token, refused
    with pytest.raises(urllib.error.HTTPError):
        get(f"{server.http_url}/v2/models/{server.model_name}/stats")
    _, body = get(f"{server.http_url}/v2/models/{server.model_name}/config")
    cfg = json.loads(body)
    assert cfg["max_batch_size"] == MAX_BATCH
    assert cfg["dynamic_batching"]["max_queue_delay_microseconds"] == QUEUE_DELAY_US
    assert [i["name"] for i in cfg["input"]] == ["image_32", "image_48", "image_64"]
    assert all(i["data_type"] == "TYPE_UINT8" for i in cfg["input"])
    assert "clipfuse" in cfg["parameters"]


def test_bad_serve_arguments_are_named(tiny_engine):
    with pytest.raises(ClipfuseError, match="must differ"):
        clipfuse.serve(tiny_engine, http_port=9000, grpc_port=9000, metrics_port=9001)
    with pytest.raises(ClipfuseError, match="is not http://HOST:PORT"):
        clipfuse.connect("ftp://127.0.0.1:21")



# ----------------------------------------------------------------------------- finding the model, shutting down

@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_connect_without_a_model_name_finds_the_served_one(protocol, server, photo_paths, local):
    """docs/serving.md's `clipfuse.connect(url)`: the server's id names its model, no token needed."""
    url = server.http_url if protocol == "http" else server.grpc_url
    with clipfuse.connect(url) as remote:
        assert remote.backend.model == server.model_name
        assert_same(remote.predict(photo_paths[:2], top_k=2), local.predict(photo_paths[:2], top_k=2))


def _our_shm() -> set:
    import os

    return {n for n in os.listdir("/dev/shm") if n.startswith(("psm_", "pytrtion"))}


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)    # as a server binds: TIME_WAIT is no obstacle
        try:
            s.bind((HOST, port))
            s.listen()
            return True
        except OSError:
            return False


def test_stop_leaves_no_process_no_port_no_shared_memory(tiny_engine):
    import psutil

    shm_before = _our_shm()
    ports = [free_port() for _ in range(3)]
    others = {p.pid for p in psutil.Process().children(recursive=True)}     # e.g. the module's server
    srv = clipfuse.serve(tiny_engine, host=HOST, http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2],
                         exit_timeout_s=2)
    children = [p for p in psutil.Process().children(recursive=True) if p.pid not in others]
    assert any("tritonserver" in p.name() for p in children)
    srv.stop()                              # returns once everything is gone: no grace period here
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert all(_port_free(p) for p in ports)
    assert not (_our_shm() - shm_before)


@contextlib.contextmanager
def serve_process(engine, tmp_path):
    """`clipfuse serve ENGINE` in a child process on free ports, once its model is ready -> (proc, ports, log);
    killed and waited for on the way out if still running."""
    ports = [free_port() for _ in range(3)]
    exe = os.path.join(os.path.dirname(sys.executable), "clipfuse")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([exe, "serve", str(engine), "--port", str(ports[0]), "--grpc-port", str(ports[1]),
                                 "--metrics-port", str(ports[2])], stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if get(f"http://{HOST}:{ports[0]}/v2/models/{engine.name}/ready", timeout=2)[0] == 200:
                    break
            except (urllib.error.URLError, OSError):
                pass
            assert proc.poll() is None, log.read_text()
            time.sleep(0.5)
        else:
            pytest.fail(f"serve did not become ready: {log.read_text()[-2000:]}")
        yield proc, ports, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_stops_serve_and_its_children(tiny_engine, tmp_path):
    """`clipfuse serve` in its own process: after SIGTERM it exits 0 within a bound, the ports are free at
    once, tritonserver and its stubs are gone, no shared memory of ours is left, no token was printed."""
    import signal
    import time

    import psutil

    shm_before = _our_shm()
    with serve_process(tiny_engine, tmp_path) as (proc, ports, log):
        with clipfuse.connect(f"http://{HOST}:{ports[0]}") as remote:       # no model= needed
            assert remote.backend.model == tiny_engine.name
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("tritonserver" in p.name() for p in children)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-2000:]
        took = time.monotonic() - t0
        _, alive = psutil.wait_procs(children, timeout=1)
        assert not alive, f"left running after serve exited: {[(p.pid, p.name()) for p in alive]}"
        assert all(_port_free(p) for p in ports), "a port is still held after serve exited"
        assert not (_our_shm() - shm_before)
        assert took < 30, f"shutdown took {took:.1f} s (bound 30 s)"
        text = log.read_text()
        assert "triton-access-token=" not in text and "triton-access-token:" not in text


def test_serve_precision_int8_serves_the_int8_graph(tiny_engine, tiny_vit_engine, photo_paths, tmp_path):
    """`serve --precision int8`: the server runs model.int8.onnx (its answers equal the local int8 graph's);
    an engine without it is refused before anything starts."""
    import shutil

    from clipfuse.export.precision.int8_export import export_int8
    from clipfuse.runtime.compare import photo_variants

    with pytest.raises(ClipfuseError, match=r"has no model\.int8\.onnx"):
        clipfuse.serve(tiny_engine, precision="int8")
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, im in enumerate(photo_variants()):
        im.save(calib / f"p{i:02d}.png")
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_vit_engine, folder)            # int8 of the collapsed RN tower is refused
    export_int8(folder, calib, count=32, targets=("cpu",))
    srv = clipfuse.serve(folder, host=HOST, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                         exit_timeout_s=2, precision="int8")
    try:
        with clipfuse.connect(srv.http_url, model=srv.model_name) as remote, \
                clipfuse.load(folder, backend="onnxruntime", precision="int8") as local:
            assert_same(remote.predict(photo_paths), local.predict(photo_paths))
    finally:
        srv.stop()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_wrong_model_name_is_no_such_model(protocol, server):
    url = server.http_url if protocol == "http" else server.grpc_url
    with pytest.raises(ClipfuseError) as e:
        clipfuse.connect(url, model="no-such-engine")
    assert str(e.value) == (f"no such model 'no-such-engine' at {url}; it serves {server.model_name!r}: "
                            "check --model")


def test_triton_log_goes_to_stderr_without_its_harmless_error_line(tiny_engine, capfd):
    """pytriton printed Triton's whole log on stdout (results only there), with an error line on every start
    that is harmless (runtime/serving/triton_log.py says why): now stderr, tagged, without that line."""
    srv = clipfuse.serve(tiny_engine, host=HOST, http_port=free_port(), grpc_port=free_port(),
                         metrics_port=free_port(), exit_timeout_s=2)
    srv.stop()
    out, err = capfd.readouterr()
    assert "model_lifecycle" not in out and "tritonserver" not in out, out[:500]
    assert "[triton] " in err and "successfully loaded 'tiny'" in err
    assert "model_config_content_name_ is empty" not in out + err


# ----------------------------------------------------------------------------- a server that dies

def _post_json(server, body: dict):
    req = urllib.request.Request(f"{server.http_url}/v2/models/{server.model_name}/infer",
                                 data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    return e.value.code, json.loads(e.value.read())["error"]


def test_an_oversized_request_is_refused_before_triton_allocates_and_the_server_stays_up(server, local):
    """The oversized request (shape [100000000, 3, 32, 32], one value of data) made tritonserver allocate
    307 GB and die; the guard answers 400 naming the shape, and the server keeps serving."""
    big = {"inputs": [{"name": i["name"], "shape": [100_000_000, 3, i["shape"][2], i["shape"][3]], "datatype": "UINT8",
                       "data": [0]} for i in local.manifest.inputs]}
    code, error = _post_json(server, big)
    assert code == 400 and error.startswith("input 'image_32' has shape [100000000, 3, 32, 32]; the model takes "
                                            f"[N, 3, 32, 32] with N in 1..{MAX_BATCH} (max_batch_size)")
    wrong = {"inputs": [{"name": "image_32", "shape": [1, 3, 4096, 4096], "datatype": "UINT8", "data": [0]}]}
    assert _post_json(server, wrong)[0] == 400
    assert _post_json(server, {"inputs": [{"name": "x", "shape": [1], "datatype": "UINT8", "data": [0]}]})[1] \
        .startswith("unknown input 'x'")
    good = {i["name"]: np.zeros((1, 3, i["shape"][2], i["shape"][3]), np.uint8) for i in local.manifest.inputs}
    out = _raw_infer(server, good, "UINT8")         # still serving, through the same port
    np.testing.assert_allclose(out.as_numpy("probs"), local.predict_arrays(good)["probs"], rtol=1e-5, atol=1e-6)
    assert get(f"{server.http_url}/v2/health/live")[0] == 200
    # gRPC is not guarded: Triton's own gRPC front end refuses the same request and stays up
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    req = service_pb2.ModelInferRequest(model_name=server.model_name)
    for i in local.manifest.inputs:
        t = req.inputs.add(name=i["name"], datatype="UINT8")
        t.shape.extend([100_000_000, 3, i["shape"][2], i["shape"][3]])
        req.raw_input_contents.append(b"\0")
    with grpc.insecure_channel(f"{HOST}:{server.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as e:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "batch-size must be <=" in e.value.details()
    assert get(f"{server.http_url}/v2/health/live")[0] == 200


def test_a_server_that_dies_takes_serve_down_nonzero_and_leaves_no_model_store(tiny_engine, tmp_path):
    """tritonserver killed under `clipfuse serve` (as the oversized request crashed it): serve
    exits 1 with one line, instead of 0, and tritonserver's model store (/tmp/folderXXXXXX) is removed."""
    import re

    import psutil

    with serve_process(tiny_engine, tmp_path) as (proc, ports, log):
        server = next(p for p in psutil.Process(proc.pid).children(recursive=True) if "tritonserver" in p.name())
        workspace = re.search(r"(/\S*/workspace_[^/\s]+)", " ".join(server.cmdline())).group(1)
        from clipfuse.runtime.serving.cleanup import model_stores

        def stores():
            return model_stores(workspace)
        assert stores(), f"the running server has a model store ({workspace})"
        server.kill()
        assert proc.wait(timeout=60) == 1, log.read_text()[-2000:]
        last = log.read_text().strip().splitlines()[-1]
        assert last.startswith(f"error: the Triton server serving '{tiny_engine.name}'") and "stopped on its own" in last
        assert not stores(), "the model store outlived the server"
