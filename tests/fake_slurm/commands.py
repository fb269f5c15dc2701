"""The fake Slurm's commands: sbatch, srun, sacct, squeue, scontrol, scancel, sinfo, sacctmgr."""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import supervisor
from .jobs import (
    ACTIVE,
    COMPACT,
    NODE,
    PARTITION,
    SlurmError,
    all_jobs,
    create,
    expand,
    load,
    next_id,
    root,
    send,
    terminate,
    update,
    user_name,
)
from .options import options_table, parse_options, parse_signal, parse_time, short_options

SBATCH_OPTIONS = options_table(
    "account array begin chdir comment constraint cpus-per-gpu cpus-per-task dependency "
    "distribution error exclude export gpus gpus-per-node gpus-per-task gres hint job-name "
    "licenses mail-type mail-user mem mem-per-cpu mem-per-gpu nodelist nodes ntasks "
    "ntasks-per-node open-mode output partition qos reservation signal time time-min wckey",
    flags="no-requeue parsable requeue",
    optional="exclusive",
)
SBATCH_SHORT = short_options(
    "A:account a:array C:constraint c:cpus-per-task D:chdir d:dependency e:error G:gpus "
    "J:job-name N:nodes n:ntasks o:output p:partition q:qos t:time w:nodelist x:exclude"
)


def _script_options(text: str) -> list[str]:
    """The arguments of the script's #SBATCH lines (read up to its first command)."""
    args = []
    for line in text.splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#SBATCH"):
            args += shlex.split(stripped[len("#SBATCH") :], comments=True)
        elif stripped and not stripped.startswith("#"):
            break
    return args


def _int_option(opts: dict[str, Any], name: str, default: int) -> int:
    value = str(opts.get(name, default)).split("-")[0]  # a range (--nodes=1-2): its minimum
    if not value.isdigit() or int(value) < 1:
        raise SlurmError(f"Invalid --{name} specification: {opts[name]}")
    return int(value)


def sbatch(args: list[str]) -> None:
    cli, rest = parse_options(args, SBATCH_OPTIONS, SBATCH_SHORT)
    if not rest:
        raise SlurmError("a batch script is required (the fake sbatch does not read stdin)")
    script = Path(rest[0])
    try:
        text = script.read_text()
    except OSError as err:
        raise SlurmError(f"Unable to open file {script}: {err.strerror}") from None
    opts, _ = parse_options(_script_options(text), SBATCH_OPTIONS, SBATCH_SHORT)
    opts.update(cli)
    for name in ("array", "dependency"):
        if name in opts:
            raise SlurmError(f"--{name} is not supported by the fake Slurm")
    nodes = _int_option(opts, "nodes", 1)
    if "ntasks-per-node" in opts:
        per_node = _int_option(opts, "ntasks-per-node", 1)
    else:
        per_node = -(-_int_option(opts, "ntasks", nodes) // nodes)
    if opts.get("open-mode", "append") not in ("append", "truncate"):
        raise SlurmError(f"Invalid --open-mode specification: {opts['open-mode']}")
    warning = None
    if "signal" in opts:
        found = re.fullmatch(r"(?:([RB]+):)?(\w+)(?:@(\d+))?", str(opts["signal"]))
        if not found:
            raise SlurmError(f"Invalid --signal specification: {opts['signal']}")
        warning = [parse_signal(found[2]), int(found[3] or 60), "B" in (found[1] or "")]
    job_id = next_id()
    workdir = str(Path(opts.get("chdir", os.getcwd())).resolve())
    copy = root() / "jobs" / f"{job_id}.sh"  # Slurm keeps the script as it was submitted
    copy.write_text(text)
    job = {
        "id": job_id,
        "name": opts.get("job-name", script.name),
        "user": user_name(),
        "workdir": workdir,
        "script": str(copy),
        "args": rest[1:],
        "options": opts,
        "partition": opts.get("partition", PARTITION),
        "nodes": nodes,
        "ntasks_per_node": per_node,
        "output": opts.get("output", "slurm-%j.out"),
        "error": opts.get("error"),
        "open_mode": opts.get("open-mode", "append"),
        "time_limit_s": parse_time(str(opts["time"])) if "time" in opts else None,
        "warning": warning,
        "requeueable": "no-requeue" not in opts,
        "kill_wait_s": float(os.environ.get("FAKE_SLURM_KILL_WAIT", 30)),
        "requeue_delay_s": float(os.environ.get("FAKE_SLURM_REQUEUE_DELAY", 0.5)),
        "start_delay_s": float(os.environ.get("FAKE_SLURM_START_DELAY", 0)),
        "state": "PENDING",
        "cancelled_by": None,
        "exit_code": "0:0",
        "starts": 0,
        "submit_time": time.time(),
        "start_time": None,
        "end_time": None,
        "supervisor": None,
        "batch_pid": None,
        "pgid": None,
        "tasks": [],
        "steps": 0,
        "attempt": False,
        "requeue": False,
        "kill_at": None,
        "warned": False,
    }
    create(job)
    supervisor.start(job_id)
    print(job_id if opts.get("parsable") else f"Submitted batch job {job_id}", flush=True)


SRUN_OPTIONS = options_table(
    "cpu-bind cpus-per-task distribution error export gpus gpus-per-node gpus-per-task gres "
    "input job-name mem nodes ntasks ntasks-per-node output",
    flags="exclusive kill-on-bad-exit label overlap unbuffered",
)
SRUN_SHORT = short_options(
    "c:cpus-per-task e:error J:job-name K:kill-on-bad-exit l:label N:nodes n:ntasks "
    "o:output u:unbuffered"
)


def srun(args: list[str]) -> int:
    """Run one step: every task here, each with its rank's variables and output files."""
    job_id = os.environ.get("SLURM_JOB_ID")
    job = load(job_id) if job_id else None
    if job is None:
        raise SlurmError("the fake srun runs steps of a batch job only (no SLURM_JOB_ID)")
    opts, command = parse_options(args, SRUN_OPTIONS, SRUN_SHORT)
    if not command:
        raise SlurmError("no command to run")
    nodes = _int_option(opts, "nodes", job["nodes"])
    per_node = _int_option(opts, "ntasks-per-node", job["ntasks_per_node"])
    ntasks = _int_option(opts, "ntasks", nodes * per_node)
    if "ntasks" in opts and "ntasks-per-node" not in opts:  # srun -n N: spread over the nodes
        per_node = -(-ntasks // nodes)
    with update(job_id) as record:
        step = record["steps"]
        record["steps"] += 1
    procs = []
    for rank in range(ntasks):
        env = {
            **os.environ,
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank % per_node),
            "SLURM_NODEID": str(rank // per_node),
            "SLURM_STEP_ID": str(step),
            "SLURM_STEPID": str(step),
            "SLURM_STEP_NUM_TASKS": str(ntasks),
            "SLURM_STEP_NUM_NODES": str(nodes),
            "SLURM_NTASKS": str(ntasks),
            "SLURM_NPROCS": str(ntasks),
        }
        out = open(expand(opts["output"], job, rank, step), "a") if "output" in opts else None  # noqa: SIM115
        err = open(expand(opts["error"], job, rank, step), "a") if "error" in opts else out  # noqa: SIM115
        try:
            procs.append(
                subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
            )
        except OSError as error:
            raise SlurmError(f"{command[0]}: {error.strerror}") from None
        finally:
            for handle in {out, err} - {None}:
                handle.close()
    with update(job_id) as record:
        record["tasks"] += [p.pid for p in procs]

    def forward(signum: int, frame: object) -> None:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(sig, forward)
    codes = [proc.wait() for proc in procs]
    with update(job_id) as record:
        record["tasks"] = [pid for pid in record["tasks"] if pid not in {p.pid for p in procs}]
    for rank, code in enumerate(codes):
        if code > 0:
            print(
                f"srun: error: {NODE}: task {rank}: Exited with exit code {code}", file=sys.stderr
            )
        elif code < 0:
            print(
                f"srun: error: {NODE}: task {rank}: {signal.Signals(-code).name}", file=sys.stderr
            )
    return max(code if code >= 0 else 128 - code for code in codes)


def _time_text(stamp: float | None) -> str:
    if stamp is None:
        return "Unknown"
    return datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%dT%H:%M:%S")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "UNLIMITED"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{text}" if days else text


def _elapsed(job: dict[str, Any]) -> str:
    if job["start_time"] is None:
        return "00:00:00"
    return _duration((job["end_time"] or time.time()) - job["start_time"])


def _select(ids: str | None) -> list[dict[str, Any]]:
    if not ids:
        return all_jobs()
    found = [load(job_id) for job_id in ids.split(",")]
    return [job for job in found if job is not None]


SACCT_FIELDS = {
    "jobid": "JobID",
    "jobidraw": "JobIDRaw",
    "jobname": "JobName",
    "state": "State",
    "exitcode": "ExitCode",
    "nodelist": "NodeList",
    "partition": "Partition",
    "account": "Account",
    "user": "User",
    "alloccpus": "AllocCPUS",
    "nnodes": "NNodes",
    "ntasks": "NTasks",
    "submit": "Submit",
    "start": "Start",
    "end": "End",
    "elapsed": "Elapsed",
    "timelimit": "Timelimit",
}
SACCT_OPTIONS = options_table(
    "endtime format jobs starttime state user",
    flags="allocations allusers duplicates noheader parsable parsable2",
)
SACCT_SHORT = short_options(
    "a:allusers D:duplicates E:endtime j:jobs n:noheader o:format P:parsable2 p:parsable "
    "S:starttime s:state u:user X:allocations"
)


def _sacct_rows(job: dict[str, Any], allocations: bool) -> list[dict[str, str]]:
    """The job's line, then (once it started) its batch step and srun steps."""
    started = job["start_time"] is not None
    state = job["state"]
    row = {
        "JobID": job["id"],
        "JobIDRaw": job["id"],
        "JobName": job["name"],
        "State": f"CANCELLED by {job['cancelled_by']}" if state == "CANCELLED" else state,
        "ExitCode": job["exit_code"],
        "NodeList": NODE if started else "None assigned",
        "Partition": job["partition"],
        "Account": job["options"].get("account", ""),
        "User": job["user"],
        "AllocCPUS": str(job["ntasks_per_node"] * int(job["options"].get("cpus-per-task", 1))),
        "NNodes": str(job["nodes"]),
        "NTasks": "",
        "Submit": _time_text(job["submit_time"]),
        "Start": _time_text(job["start_time"]),
        "End": _time_text(job["end_time"] if state not in ACTIVE else None),
        "Elapsed": _elapsed(job),
        "Timelimit": _duration(job["time_limit_s"]),
    }
    rows = [row]
    if started and not allocations and state not in ("PENDING", "REQUEUED"):
        step_state = "RUNNING" if state in ACTIVE else state
        for step in ["batch", *map(str, range(job["steps"]))]:
            name = "batch" if step == "batch" else Path(job["script"]).name
            step_id = f"{job['id']}.{step}"
            rows.append({**row, "JobID": step_id, "JobIDRaw": step_id, "JobName": name})
            rows[-1].update(State=step_state, Partition="", User="")
    return rows


def sacct(args: list[str]) -> None:
    opts, rest = parse_options(args, SACCT_OPTIONS, SACCT_SHORT)
    if rest:
        raise SlurmError(f"unexpected argument {rest[0]!r}")
    wanted = opts.get("format", "JobID,JobName,Partition,Account,AllocCPUS,State,ExitCode")
    fields = []
    for name in wanted.split(","):
        key = name.split("%")[0].lower()
        if key not in SACCT_FIELDS:
            raise SlurmError(f'Invalid field requested: "{name}"')
        fields.append(SACCT_FIELDS[key])
    rows = [r for job in _select(opts.get("jobs")) for r in _sacct_rows(job, "allocations" in opts)]
    table = ([] if "noheader" in opts else [fields]) + [[r[f] for f in fields] for r in rows]
    for line in table:
        if "parsable2" in opts:
            print("|".join(line))
        elif "parsable" in opts:
            print("|".join(line) + "|")
        else:
            print(" ".join(value[:10].rjust(10) for value in line))


SQUEUE_OPTIONS = options_table(
    "format jobs name partition states user",
    flags="all long me noheader",
)
SQUEUE_SHORT = short_options(
    "a:all h:noheader j:jobs l:long n:name o:format p:partition t:states u:user"
)
SQUEUE_HEADERS = {
    "i": "JOBID",
    "j": "NAME",
    "T": "STATE",
    "t": "ST",
    "u": "USER",
    "P": "PARTITION",
    "M": "TIME",
    "l": "TIME_LIMIT",
    "D": "NODES",
    "R": "NODELIST(REASON)",
    "N": "NODELIST",
    "r": "REASON",
}


def _squeue_value(job: dict[str, Any], letter: str) -> str:
    state = job["state"]
    running = state in ("RUNNING", "COMPLETING", "PREEMPTED")
    reason = "BeginTime" if state == "REQUEUED" else "None"
    values = {
        "i": job["id"],
        "j": job["name"],
        "T": state,
        "t": COMPACT.get(state, state[:2]),
        "u": job["user"],
        "P": job["partition"],
        "M": _elapsed(job) if running else "0:00",
        "l": _duration(job["time_limit_s"]),
        "D": str(job["nodes"]),
        "R": NODE if running else f"({reason})",
        "N": NODE if running else "",
        "r": reason,
    }
    if letter not in values:
        raise SlurmError(f"the fake squeue does not know the format field %{letter}")
    return values[letter]


def squeue(args: list[str]) -> None:
    opts, rest = parse_options(args, SQUEUE_OPTIONS, SQUEUE_SHORT)
    if rest:
        raise SlurmError(f"unexpected argument {rest[0]!r}")
    jobs = _select(opts.get("jobs"))
    if opts.get("jobs") and not jobs:
        raise SlurmError("slurm_load_jobs error: Invalid job id specified")
    states = str(opts.get("states", "")).upper().split(",") if "states" in opts else None
    if states and "ALL" not in states:
        jobs = [j for j in jobs if j["state"] in states or COMPACT.get(j["state"]) in states]
    elif states is None and "jobs" not in opts:  # by default, only jobs still in the queue
        jobs = [j for j in jobs if j["state"] in ACTIVE]
    fmt = opts.get("format", "%.18i %.9P %.8j %.8u %.2t %.10M %.6D %R")
    fields = re.compile(r"%(\.?)(-?)(\d*)([A-Za-z])")

    def line(value_of: Any) -> str:
        def one(found: re.Match) -> str:
            text = value_of(found[4])
            if found[3]:
                width = int(found[3])
                text = text[:width]
                text = text.rjust(width) if found[1] else text.ljust(width)
            return text

        return fields.sub(one, fmt).rstrip()

    if "noheader" not in opts:
        print(line(lambda letter: SQUEUE_HEADERS.get(letter, letter.upper())))
    for job in jobs:
        print(line(lambda letter, job=job: _squeue_value(job, letter)))


def requeue(job_id: str) -> None:
    """`scontrol requeue`: a running job ends (SIGTERM, then SIGKILL after KillWait) and runs
    again; a finished job runs again."""
    restart = False
    with update(job_id) as job:
        if not job["requeueable"]:
            raise SlurmError(f"Requested operation is presently disabled for job {job_id}")
        if job["state"] in ("PENDING", "REQUEUED") or job["requeue"]:
            raise SlurmError(f"Job is pending execution for job {job_id}")
        job.update(requeue=True, state="REQUEUED", cancelled_by=None)
        if job["attempt"]:  # its supervisor runs it again once this attempt has ended
            terminate(job)
        else:
            job.update(requeue=False, state="PENDING")
            restart = True
    if restart:
        supervisor.start(job_id)


def preempt(job_id: str) -> None:
    """Slurm preempting a running job with PreemptMode=REQUEUE: SIGTERM to its tasks, SIGKILL
    after KillWait, then the job runs again (Slurm requeues it itself)."""
    with update(job_id) as job:
        if job["state"] != "RUNNING":
            raise SlurmError(f"job {job_id} is {job['state']}, not RUNNING: nothing to preempt")
        job.update(state="PREEMPTED", requeue=True)
        terminate(job)


def cancel(job_id: str) -> None:
    """`scancel`: CANCELLED at once, then SIGTERM to the tasks and SIGKILL after KillWait."""
    with update(job_id) as job:
        if job["state"] not in ACTIVE:
            raise SlurmError(
                f"Kill job error on job id {job_id}: Job/step already completing or completed"
            )
        job.update(state="CANCELLED", cancelled_by=os.getuid(), requeue=False, end_time=time.time())
        terminate(job)


def _show_job(job: dict[str, Any], oneliner: bool) -> str:
    state, account = job["state"], job["options"].get("account", "(null)")
    lines = [
        f"JobId={job['id']} JobName={job['name']}",
        f"UserId={job['user']}({os.getuid()}) Account={account}",
        f"JobState={state} Reason={'BeginTime' if state == 'REQUEUED' else 'None'}",
        f"Requeue={int(job['requeueable'])} Restarts={max(0, job['starts'] - 1)} BatchFlag=1 "
        f"ExitCode={job['exit_code']}",
        f"RunTime={_elapsed(job)} TimeLimit={_duration(job['time_limit_s'])}",
        f"SubmitTime={_time_text(job['submit_time'])} StartTime={_time_text(job['start_time'])} "
        f"EndTime={_time_text(job['end_time'])}",
        f"Partition={job['partition']} NodeList={NODE if state == 'RUNNING' else '(null)'}",
        f"NumNodes={job['nodes']} NumTasks={job['nodes'] * job['ntasks_per_node']}",
        f"Command={job['script']} WorkDir={job['workdir']}",
        f"StdErr={expand(job['error'] or job['output'], job)} StdOut={expand(job['output'], job)}",
    ]
    return (" " if oneliner else "\n   ").join(lines)


def cluster_settings() -> dict[str, str]:
    """The cluster's partitions (the default marked *), the user's default account ("": none)
    and AccountingStorageEnforce, from $FAKE_SLURM_PARTITIONS (comma-separated),
    $FAKE_SLURM_DEFAULT_ACCOUNT and $FAKE_SLURM_ENFORCE: by default a cluster where a job
    needs neither a partition nor an account."""
    return {
        "partitions": os.environ.get("FAKE_SLURM_PARTITIONS", f"{PARTITION}*"),
        "account": os.environ.get("FAKE_SLURM_DEFAULT_ACCOUNT", "fake"),
        "enforce": os.environ.get("FAKE_SLURM_ENFORCE", "associations,limits,qos"),
    }


def sinfo(args: list[str]) -> None:
    """`sinfo [-h] [-o %P]`: the partitions, one a line (the only format known)."""
    opts, rest = parse_options(
        args, options_table("format", flags="noheader"), short_options("h:noheader o:format")
    )
    if rest or opts.get("format", "%P") != "%P":
        raise SlurmError(f"the fake sinfo knows only `sinfo [-h] [-o %P]`, not {args}")
    if "noheader" not in opts:
        print("PARTITION")
    for name in cluster_settings()["partitions"].split(","):
        print(name)


def sacctmgr(args: list[str]) -> None:
    """`sacctmgr [-n] show user NAME format=defaultaccount`: the user's default account;
    nothing where the user has none (no association)."""
    opts, rest = parse_options(args, options_table("", flags="noheader"), {"n": "noheader"})
    if rest[:2] not in (["show", "user"], ["list", "user"]) or len(rest) != 4:
        raise SlurmError(f"the fake sacctmgr knows only `show user NAME format=...`, not {args}")
    if rest[3].lower() != "format=defaultaccount":
        raise SlurmError(f"the fake sacctmgr prints only format=defaultaccount, not {rest[3]}")
    account = cluster_settings()["account"]
    if "noheader" not in opts:
        print(f"{'Def Acct':>10}\n{'-' * 10}")
    if account and rest[2] == user_name():
        print(f"{account:>10}")


def scontrol(args: list[str]) -> None:
    opts, rest = parse_options(
        args,
        {"oneliner": False, "details": False, "quiet": False},
        {"o": "oneliner", "d": "details", "Q": "quiet"},
    )
    if rest == ["show", "config"]:
        print("Configuration data as of 2026-01-01T00:00:00")
        print(f"AccountingStorageEnforce = {cluster_settings()['enforce']}")
        print("ClusterName             = fake")
    elif rest[:1] == ["requeue"] and len(rest) == 2:
        for job_id in rest[1].split(","):
            requeue(job_id)
    elif rest[:2] in (["show", "job"], ["show", "jobs"], ["show", "jobid"]) and len(rest) <= 3:
        jobs = _select(rest[2] if len(rest) == 3 else None)
        if not jobs:
            raise SlurmError("slurm_load_jobs error: Invalid job id specified")
        print("\n\n".join(_show_job(job, "oneliner" in opts) for job in jobs))
    else:
        raise SlurmError(f"the fake scontrol does not know {' '.join(rest) or 'that'!r}")


def scancel(args: list[str]) -> None:
    table = {"signal": True, "batch": False, "full": False, "quiet": False}
    opts, ids = parse_options(args, table, {"s": "signal", "b": "batch", "f": "full", "Q": "quiet"})
    if not ids:
        raise SlurmError("No job identification provided")
    for job_id in (i for arg in ids for i in arg.split(",")):
        if "signal" not in opts:
            cancel(job_id)
            continue
        job = load(job_id)
        if job is None or job["state"] not in ACTIVE:
            raise SlurmError(
                f"Kill job error on job id {job_id}: Job/step already completing or completed"
            )
        send(job, parse_signal(opts["signal"]), batch="batch" in opts, full="full" in opts)


COMMANDS = {
    "sbatch": sbatch,
    "srun": srun,
    "sacct": sacct,
    "squeue": squeue,
    "scontrol": scontrol,
    "scancel": scancel,
    "sinfo": sinfo,
    "sacctmgr": sacctmgr,
}


def main(argv: list[str]) -> int:
    command, args = Path(argv[0]).name, argv[1:]
    if command == "_supervise":
        supervisor.supervise(args[0])
        return 0
    try:
        return COMMANDS[command](args) or 0
    except SlurmError as err:
        print(f"{command}: error: {err}", file=sys.stderr)
        return 1
