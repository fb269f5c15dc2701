"""A fake Slurm on this machine, for tests: sbatch, srun, squeue, sacct, scontrol, scancel, sinfo
and sacctmgr.

Real submitit Slurm jobs run through it as on a one-node cluster, so tests can inject the
faults a cluster produces (the warning signal, preemption, a time limit, scancel, requeue).

The executables in this folder run `cli.py <their name> ARGS`. Each job is a JSON record under
$FAKE_SLURM_DIR/jobs (jobs.py) and a supervisor process in its own session (supervisor.py) that
runs the batch script with bash in a new process group, records the states
PENDING -> RUNNING -> COMPLETED | FAILED | CANCELLED | TIMEOUT (REQUEUED or PREEMPTED in
between), runs the script again when the job is requeued, sends the `--signal` warning before
the time limit and kills what is left KillWait ($FAKE_SLURM_KILL_WAIT, default 30 s) after a
SIGTERM. srun (commands.py) starts a step's tasks here with Slurm's variables and records their
pids, which is how a test signals every task of a job as Slurm does. The cluster's partitions,
the user's default account and AccountingStorageEnforce (what `sinfo`, `sacctmgr` and `scontrol
show config` print) come from $FAKE_SLURM_PARTITIONS, $FAKE_SLURM_DEFAULT_ACCOUNT and
$FAKE_SLURM_ENFORCE (commands.cluster_settings). `FakeSlurm` (handle.py) is
the tests' handle: the `fake_slurm` fixture of tests/conftest.py. Linux only (/proc, prctl);
standard library only, so any python3 runs the commands ($FAKE_SLURM_PYTHON picks one).
"""
