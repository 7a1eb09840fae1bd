"""Lion (scaletrain_lion/lion.py) against the paper's pseudo-code (Chen et al. 2023, Algorithm 2).

Why the comparisons are exact (tolerance 0): the optimizer and the reference below apply the same elementwise
IEEE-754 operations (mul, add, sub, each correctly rounded; sign, exact) to the same fp32 operands in the same
order, with the same Python scalars (each converted to fp32 by the same kernel). There is no reduction, so no
summation order a vector width could change: the bits agree on any CPU (AVX2 or AVX-512) and thread count.
"""

import io

import pytest
import torch

from scaletrain_lion.lion import Lion


def paper_lion(p: torch.Tensor, grads: list[torch.Tensor], lr: float, b1: float, b2: float, wd: float):
    """The paper's pseudo-code, line for line, for one parameter over a fixed list of gradients."""
    m = torch.zeros_like(p)
    for g in grads:
        c = b1 * m + (1 - b1) * g
        p = p - lr * (torch.sign(c) + wd * p)
        m = b2 * m + (1 - b2) * g
    return p, m


def run_lion(params: list[torch.Tensor], grads_per_step: list[list[torch.Tensor]], opt: Lion) -> None:
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()


def test_first_step_moves_each_coordinate_by_lr_times_the_gradient_sign_plus_decay():
    # m = 0, so c = (1 - b1) * g has g's sign; p = 2 - 0.5 * (sign(g) + 0.5 * 2): every number here is exact
    p = torch.tensor([2.0, 2.0, 2.0], requires_grad=True)
    p.grad = torch.tensor([3.0, 0.0, -1e-20])
    Lion([p], lr=0.5, weight_decay=0.5).step()
    assert p.tolist() == [1.0, 1.5, 2.0]  # sign(0) = 0: a zero gradient leaves only the decay


def test_three_steps_with_two_param_groups_equal_the_paper_pseudo_code_bit_for_bit():
    a0 = torch.tensor([[0.5, -1.25, 2.0], [0.75, 0.0, -0.3]])
    b0 = torch.tensor([1.5, -0.25])
    grads_a = [  # entry [0, 1] is zero at every step (c stays 0: only the decay moves it); [1, 0] only at step 2
        torch.tensor([[10.0, 0.0, -0.5], [0.2, 1.0, -3.0]]),
        torch.tensor([[10.0, 0.0, 0.7], [0.0, -1.0, 0.1]]),
        # [0, 0]: a small gradient against a large momentum, so sign(c) != sign(g) (c = 0.1791 - 0.01)
        torch.tensor([[-0.1, 0.0, 0.25], [-0.4, 2.0, 0.05]]),
    ]
    grads_b = [torch.tensor([0.3, -2.0]), torch.tensor([-0.6, 0.0]), torch.tensor([0.9, 1.1])]
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    opt = Lion(
        [
            {"params": [a], "lr": 0.01, "weight_decay": 0.5},  # default betas (0.9, 0.99)
            {"params": [b], "lr": 0.003, "weight_decay": 0.0, "betas": (0.8, 0.95)},
        ],
        lr=0.02,
        betas=(0.9, 0.99),
        weight_decay=0.1,
    )
    run_lion([a, b], [list(gs) for gs in zip(grads_a, grads_b)], opt)

    ref_a, ref_m_a = paper_lion(a0, grads_a, lr=0.01, b1=0.9, b2=0.99, wd=0.5)
    ref_b, ref_m_b = paper_lion(b0, grads_b, lr=0.003, b1=0.8, b2=0.95, wd=0.0)
    assert torch.equal(a.detach(), ref_a) and torch.equal(opt.state[a]["exp_avg"], ref_m_a)
    assert torch.equal(b.detach(), ref_b) and torch.equal(opt.state[b]["exp_avg"], ref_m_b)


def test_a_parameter_without_gradient_is_left_alone_and_gets_no_state():
    used, unused = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    used.grad = torch.tensor([1.0, -1.0])
    opt = Lion([used, unused], lr=0.1, weight_decay=1.0)
    opt.step()
    assert unused.tolist() == [1.0, 1.0] and unused not in opt.state
    assert "exp_avg" in opt.state[used]


def _loss(p: torch.Tensor) -> torch.Tensor:
    """Elementwise loss (no reduction in the gradient), so gradients too are bit-reproducible."""
    return ((p - torch.tensor([0.3, -0.7, 1.9])) ** 2 * torch.tensor([1.0, 4.0, 0.5])).sum()


def _fresh(p0: torch.Tensor) -> tuple[torch.Tensor, Lion]:
    p = p0.clone().requires_grad_()
    return p, Lion([p], lr=0.05, betas=(0.9, 0.99), weight_decay=0.2)


def _steps(p: torch.Tensor, opt: Lion, n: int) -> None:
    for _ in range(n):
        opt.zero_grad()
        _loss(p).backward()
        opt.step()


def test_step_with_a_closure_returns_its_loss_and_equals_a_manual_backward_then_step():
    p_manual, opt_manual = _fresh(torch.tensor([1.0, 1.0, 1.0]))
    _steps(p_manual, opt_manual, 1)
    p, opt = _fresh(torch.tensor([1.0, 1.0, 1.0]))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _loss(p)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() == _loss(torch.tensor([1.0, 1.0, 1.0])).item()
    assert torch.equal(p.detach(), p_manual.detach())


def test_state_dict_round_trip_resumes_bit_for_bit():
    p0 = torch.tensor([1.0, -2.0, 0.5])
    p_ref, opt_ref = _fresh(p0)
    _steps(p_ref, opt_ref, 4)

    p, opt = _fresh(p0)
    _steps(p, opt, 2)
    buf = io.BytesIO()
    torch.save({"param": p.detach(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    p_resumed, opt_resumed = _fresh(saved["param"])
    opt_resumed.load_state_dict(saved["optim"])
    _steps(p_resumed, opt_resumed, 2)

    assert torch.equal(p_resumed.detach(), p_ref.detach())
    assert torch.equal(opt_resumed.state[p_resumed]["exp_avg"], opt_ref.state[p_ref]["exp_avg"])


@pytest.mark.parametrize(
    "kwargs",
    [{"lr": 0.0}, {"betas": (0.9, 1.0)}, {"betas": (-0.1, 0.99)}, {"weight_decay": -1.0}],
)
def test_invalid_hyperparameters_are_refused(kwargs):
    with pytest.raises(ValueError, match="^Lion: "):
        Lion([torch.zeros(1, requires_grad=True)], **kwargs)


def test_lion_on_dtensor_shards_equals_lion_on_plain_tensors(tmp_path):
    """FSDP2 hands the optimizer DTensor parameters and gradients; Lion's ops must run on them unchanged. One
    process, one shard: the local tensors are the full ones, so the same ops give the same bits."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        p0 = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
        grads = [torch.tensor([[1.0, 0.0], [-2.0, 0.5]]), torch.tensor([[-0.3, 0.0], [0.1, 4.0]])]
        plain = p0.clone().requires_grad_()
        shard = torch.nn.Parameter(distribute_tensor(p0.clone(), mesh, [Shard(0)]))
        opt_plain = Lion([plain], lr=0.1, weight_decay=0.5)
        opt_shard = Lion([shard], lr=0.1, weight_decay=0.5)
        run_lion([plain], [[g] for g in grads], opt_plain)
        run_lion([shard], [[distribute_tensor(g, mesh, [Shard(0)])] for g in grads], opt_shard)
        m_shard = opt_shard.state[shard]["exp_avg"]
        assert isinstance(shard, DTensor) and isinstance(m_shard, DTensor)  # the state follows the parameter
        assert torch.equal(shard.full_tensor(), plain.detach())
        assert torch.equal(m_shard.full_tensor(), opt_plain.state[plain]["exp_avg"])
    finally:
        dist.destroy_process_group()
