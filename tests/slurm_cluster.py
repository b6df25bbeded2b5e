"""A real one-node SLURM cluster on this host for the tests: munged, slurmctld and slurmd, started as root
with a configuration in a temporary folder, stopped afterwards. Needs Debian's slurm-wlm and munge."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

CONF = """\
ClusterName=selfreward-test
SlurmctldHost={host}
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
DependencyParameters=kill_invalid_depend
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
NodeName={host} CPUs={cpus} RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def missing() -> str | None:
    """Why no cluster can be started here, or None."""
    needed = ("sbatch", "scontrol", "squeue", "slurmctld", "slurmd", "munged")
    absent = [name for name in needed if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]
    if absent:
        return f"SLURM is not installed ({', '.join(absent)} missing): apt-get install slurm-wlm munge (CI does)"
    if os.geteuid() != 0:
        return "starting a local SLURM cluster needs root"
    return None


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        host = socket.gethostname().split(".")[0]
        for folder in ("state", "spool"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(CONF.format(host=host, root=self.root, cpus=os.cpu_count() or 1))
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        subprocess.run(["/usr/sbin/slurmctld"], env=self.env, check=True)
        subprocess.run(["/usr/sbin/slurmd"], env=self.env, check=True)
        deadline = time.time() + 60
        while self.run("sinfo", "-h", "-o", "%T").strip() != "idle":
            if time.time() > deadline:
                raise RuntimeError(f"the SLURM node never became idle: {(self.root / 'slurmctld.log').read_text()[-2000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld"):
            pid_file = self.root / f"{name}.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        deadline = time.time() + 15
        while any(self._alive(name) for name in ("slurmd", "slurmctld")) and time.time() < deadline:
            time.sleep(0.2)

    def _alive(self, name: str) -> bool:
        pid_file = self.root / f"{name}.pid"
        try:
            os.kill(int(pid_file.read_text().strip()), 0)
        except (OSError, ValueError):
            return False
        return True

    def run(self, *command: str) -> str:
        return subprocess.run(list(command), env=self.env, capture_output=True, text=True, check=True).stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as key=value pairs (the first task's, for an array)."""
        fields: dict[str, str] = {}
        for token in self.run("scontrol", "show", "job", "-o", job_id).splitlines()[0].split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_idle(self, timeout: float) -> None:
        """Until no job is pending or running."""
        deadline = time.time() + timeout
        while self.run("squeue", "-h", "-o", "%i").strip():
            if time.time() > deadline:
                raise TimeoutError(self.run("squeue"))
            time.sleep(0.5)
