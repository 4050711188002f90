"""The sample job `gpumarket up` runs once to show the platform working end to end."""

import asyncio
import json
import secrets
import tempfile
import time
from decimal import Decimal
from pathlib import Path

from rich.console import Console

from gpumarket.admin import grant_credits
from gpumarket.client import Client, LogEvent, StatusEvent
from gpumarket.platform import SAMPLE_IMAGE, LocalPlatform
from scheduler.schemas import JobOut

SAMPLE_INPUT = b"hello from the gpu marketplace\n"
SAMPLE_COMMAND = [
    "sh",
    "-c",
    'echo "running on GPUs $NVIDIA_VISIBLE_DEVICES"; '
    "tr a-z A-Z < /inputs/hello.txt > /outputs/result.txt; "
    "wc -c /inputs/hello.txt; echo done",
]


def dev_accounts(data_dir: Path) -> dict[str, dict[str, str]]:
    """Dev accounts for this data dir, created once and kept (0600) for the developer."""
    path = data_dir / "dev-accounts.json"
    if path.exists():
        return json.loads(path.read_text())
    accounts = {
        role: {"email": f"dev-{role}@gpumarket.dev", "password": secrets.token_urlsafe(12)}
        for role in ("requester", "provider")
    }
    path.write_text(json.dumps(accounts, indent=2))
    path.chmod(0o600)
    return accounts


def start_local_provider(
    platform: LocalPlatform, account: dict[str, str], timeout: float = 60
) -> None:
    """Joins the local daemon with the dev provider account (or resumes it) and waits
    until the registry sees it online."""
    client = Client(platform.gateway_url)
    client.register_or_login(account["email"], account["password"], "provider")
    join_token = None
    if not (platform.data_dir / "provider.json").exists():
        join_token = client.create_join_token().token
    platform.start_provider(join_token)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.state == "online" for p in client.providers()):
            return
        time.sleep(0.5)
    raise RuntimeError("the local provider did not come online")


# The dev requester's credits on a fresh local platform (granted once per data dir).
DEV_CREDITS = Decimal(1000)


def fund_dev_requester(platform: LocalPlatform, account: dict[str, str]) -> dict:
    """Registers the dev requester and grants it DEV_CREDITS, once: the grant's
    reference makes a restart change nothing."""
    assert platform.servers is not None
    Client(platform.gateway_url).register_or_login(
        account["email"], account["password"], "requester"
    )
    return asyncio.run(
        grant_credits(
            platform.servers.postgres.url,
            account["email"],
            DEV_CREDITS,
            reference="dev-welcome",
            memo="credits for local development",
        )
    )


def run_sample_job(gateway_url: str, account: dict[str, str], console: Console) -> JobOut:
    with Client(gateway_url) as client:
        client.register_or_login(account["email"], account["password"], "requester")
        upload = client.upload(SAMPLE_INPUT, "hello.txt")
        job = client.submit(
            {
                "image": SAMPLE_IMAGE,
                "command": SAMPLE_COMMAND,
                "resources": {"gpus": 1},
                "inputs": [{"file_id": upload.file_id, "path": "hello.txt"}],
                "max_duration_s": 120,
            }
        )
        console.print(f"sample job [bold]{job.id}[/] submitted")
        for event in client.events(job.id):
            if isinstance(event, StatusEvent):
                reason = f" ({event.job.waiting_reason})" if event.job.waiting_reason else ""
                console.print(f"  status: [cyan]{event.job.status}[/]{reason}")
            elif isinstance(event, LogEvent):
                console.print(f"  log: {event.line}", highlight=False)
        job = client.job(job.id)
        with tempfile.TemporaryDirectory() as tmp:
            for output in client.outputs(job.id):
                content = client.download(output, Path(tmp)).read_text(errors="replace")
                console.print(f"  output {output.path} ({output.size} bytes): {content.strip()}")
        console.print(f"sample job result: [bold]{job.status}[/] exit_code={job.exit_code}")
        return job
