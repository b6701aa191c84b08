"""A real ComfyUI server for the tests: started as a subprocess, driven over HTTP on loopback."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

PACK_NAME = "comfyui-cvg"
MODEL_KEYS = (
    "checkpoints", "vae", "loras", "clip", "clip_vision", "text_encoders", "diffusion_models", "unet",
    "animatediff_models", "animatediff_motion_lora", "upscale_models", "controlnet",
)
IMPORT_FAILED = "IMPORT FAILED"


class ComfyError(RuntimeError):
    """The server refused or failed a prompt; the message carries the server's own words."""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, comfy_path, pack_dir, work_dir, startup_timeout=300):
        self.comfy_path = Path(comfy_path)
        self.pack_dir = Path(pack_dir).resolve()
        self.work = Path(work_dir)
        self.models_dir = self.work / "models"
        self.input_dir = self.work / "input"
        self.output_dir = self.work / "output"
        self.temp_dir = self.work / "temp"
        self.log_path = self.work / "server.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        self.process = None

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self):
        custom_nodes = self.work / "custom_nodes"
        for d in (custom_nodes, self.input_dir, self.output_dir, self.temp_dir):
            d.mkdir(parents=True, exist_ok=True)
        link = custom_nodes / PACK_NAME
        if not link.exists():
            link.symlink_to(self.pack_dir, target_is_directory=True)
        lines = [f"cvg_test:", f"    base_path: {self.work}", f"    custom_nodes: {custom_nodes}"]
        for key in MODEL_KEYS:
            (self.models_dir / key).mkdir(parents=True, exist_ok=True)
            lines.append(f"    {key}: {self.models_dir / key}")
        # Old ComfyUI reads diffusion models from "unet": point it at the same folder.
        lines[-len(MODEL_KEYS) + MODEL_KEYS.index("unet")] = f"    unet: {self.models_dir / 'diffusion_models'}"
        config = self.work / "extra_model_paths.yaml"
        config.write_text("\n".join(lines) + "\n")
        cmd = [
            sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--output-directory", str(self.output_dir), "--input-directory", str(self.input_dir),
            "--temp-directory", str(self.temp_dir), "--extra-model-paths-config", str(config),
            "--disable-auto-launch",
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(cmd, cwd=self.comfy_path, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise ComfyError(f"ComfyUI exited during start-up (code {self.process.returncode}):\n{self.log()[-4000:]}")
            try:
                self.get("/object_info")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise ComfyError(f"ComfyUI did not answer within {self.startup_timeout}s:\n{self.log()[-4000:]}")

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def import_failures(self, pack_only=True):
        """Log lines saying this pack (or, with pack_only=False, any node module) failed to import.
        Current ComfyUI logs its own optional modules (e.g. audio nodes without torchaudio) the same way."""
        lines = [line for line in self.log().splitlines() if IMPORT_FAILED in line]
        return [line for line in lines if PACK_NAME in line] if pack_only else lines

    # -- HTTP -------------------------------------------------------------------------------------
    def get(self, path, timeout=60):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path, payload, timeout=60):
        data = json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, {"error": body.decode(errors="replace")}

    def object_info(self):
        return self.get("/object_info")

    def comfyui_version(self):
        """The server's ComfyUI version, or None for trees older than the version report (the test host)."""
        return (self.get("/system_stats").get("system") or {}).get("comfyui_version")

    # -- prompts ----------------------------------------------------------------------------------
    def queue(self, prompt):
        status, reply = self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        if status != 200 or reply.get("error") or reply.get("node_errors"):
            raise ComfyError(f"prompt rejected (HTTP {status}): {json.dumps(reply, indent=1)[:6000]}")
        return reply["prompt_id"]

    def wait(self, prompt_id, timeout=600):
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                entry = history[prompt_id]
                status = entry.get("status") or {}
                if status.get("status_str") == "error" or not status.get("completed", True):
                    raise ComfyError(f"prompt failed: {_execution_error(status)}")
                return entry.get("outputs", {})
            if self.process.poll() is not None:
                raise ComfyError(f"ComfyUI died while running the prompt:\n{self.log()[-4000:]}")
            time.sleep(0.2)
        raise ComfyError(f"prompt {prompt_id} did not finish within {timeout}s")

    def run(self, prompt, timeout=600):
        """Queue an API-format prompt and return {node_id: outputs}; raise ComfyError on any failure."""
        return self.wait(self.queue(prompt), timeout)

    def run_expect_error(self, prompt, timeout=600):
        """Run a prompt that must fail; return the server's error text (validation or execution)."""
        try:
            self.run(prompt, timeout)
        except ComfyError as e:
            return str(e)
        raise AssertionError("the prompt was expected to fail but succeeded")

    def output_files(self):
        return sorted(p for p in self.output_dir.rglob("*") if p.is_file())


def _execution_error(status):
    for event, data in status.get("messages", []):
        if event == "execution_error":
            return (
                f"{data.get('node_type')} (node {data.get('node_id')}): {data.get('exception_type')}: "
                f"{data.get('exception_message')}\n{''.join(data.get('traceback', []))[-3000:]}"
            )
    if any(event == "execution_interrupted" for event, _ in status.get("messages", [])):
        return "interrupted (execution_interrupted)"
    return json.dumps(status)[:3000]
