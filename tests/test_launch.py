"""Launch detection from monkeypatched environments; Slurm nodelist and tasks-per-node syntax."""
import pytest

from fedpft_dist.errors import UserError
from fedpft_dist.runtime import cpu_budget, detect_launch, expand_nodelist, expand_tasks_per_node, slurm_port


@pytest.mark.parametrize("text, hosts", [
    ("node01", ["node01"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
    ("n[008-010]", ["n008", "n009", "n010"]),
    ("a[1-2],b3,c[5]", ["a1", "a2", "b3", "c5"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("login-1.cluster,node[1,3]", ["login-1.cluster", "node1", "node3"]),
])
def test_expand_nodelist(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("bad", ["node[01-", "node[3-1]", "node[a-b]", "node]1["])
def test_malformed_nodelist_is_a_user_error(bad):
    with pytest.raises(UserError):
        expand_nodelist(bad)


def test_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]
    with pytest.raises(UserError):
        expand_tasks_per_node("2(x)")


def test_single_process():
    info = detect_launch({})
    assert (info.kind, info.rank, info.world_size, info.local_rank, info.distributed) == ("single", 0, 1, 0, False)


def test_torchrun():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
           "MASTER_ADDR": "node01", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x", "GROUP_RANK": "0",
           # inherited from an sbatch allocation: torchrun's variables win
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "12"}
    info = detect_launch(env)
    assert (info.kind, info.rank, info.world_size, info.local_rank, info.local_world_size) == ("torchrun", 3, 8, 1, 4)
    assert (info.master_addr, info.master_port) == ("node01", 29500)


def test_torchrun_without_master_is_an_error():
    with pytest.raises(UserError, match="MASTER_ADDR"):
        detect_launch({"RANK": "0", "WORLD_SIZE": "2"})


def test_torchrun_rank_out_of_range():
    with pytest.raises(UserError, match="outside world size"):
        detect_launch({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"})


def test_slurm_srun_multi_node():
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8",
           "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_STEP_NODELIST": "gpu[07-08]"}
    info = detect_launch(env)
    assert (info.kind, info.rank, info.world_size, info.local_rank, info.local_world_size, info.node_rank) == \
        ("slurm", 5, 8, 1, 4, 1)
    assert info.master_addr == "gpu07"
    assert info.master_port == slurm_port(4242) == 20000 + 4242
    # every task of the job derives the same port
    assert detect_launch({**env, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}).master_port \
        == info.master_port


def test_slurm_uneven_tasks_and_master_override():
    env = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "1", "SLURM_PROCID": "4", "SLURM_NTASKS": "5",
           "SLURM_LOCALID": "0", "SLURM_NODEID": "2", "SLURM_TASKS_PER_NODE": "2(x2),1",
           "SLURM_JOB_NODELIST": "a[1-3]", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "31000"}
    info = detect_launch(env)
    assert (info.world_size, info.local_world_size, info.master_addr, info.master_port) == (5, 1, "10.0.0.1", 31000)


def test_sbatch_batch_step_is_not_a_rank():
    # The batch script itself has SLURM_PROCID/NTASKS but no step id: it must not wait for peers.
    env = {"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n1"}
    assert detect_launch(env).kind == "single"


def test_open_mpi():
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    info = detect_launch(env)
    assert (info.kind, info.rank, info.world_size, info.local_rank, info.local_world_size) == ("mpi", 2, 4, 0, 2)
    assert info.master_addr is None and info.master_port is None  # agreed later via mpi4py


def test_mpich_hydra():
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
    info = detect_launch(env)
    assert (info.kind, info.rank, info.world_size, info.local_rank, info.local_world_size) == ("mpi", 1, 2, 1, 2)


def test_garbage_rank_is_a_user_error():
    with pytest.raises(UserError, match="PMI_RANK"):
        detect_launch({"PMI_RANK": "one", "PMI_SIZE": "2"})


def test_cpu_budget(monkeypatch):
    assert cpu_budget(4, {"SLURM_CPUS_PER_TASK": "6"}) == 6
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert cpu_budget(4, {}) == 4
    assert cpu_budget(32, {}) == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2})  # bound by the launcher
    assert cpu_budget(4, {}) == 3
