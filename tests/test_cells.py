"""The reference cells of rnmt.nn.cells against torch's own, in float64."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnmt.nn.cells import GRUCell, LSTMCell, RNNCell, run_cell

ATOL = 1e-10
INPUT, HIDDEN, BATCH, SEQ = 5, 4, 4, 6
LENGTHS = torch.tensor([3, 6, 1, 4])  # unsorted, with one full-length sentence

KINDS = {
    # name: (reference cell, torch cell, fused torch layer)
    "rnn": (RNNCell, nn.RNNCell, nn.RNN),
    "lstm": (LSTMCell, nn.LSTMCell, nn.LSTM),
    "gru": (GRUCell, nn.GRUCell, nn.GRU),
}


def close(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=ATOL)


def random_state(kind: str, batch: int, *leading: int) -> Tensor | tuple[Tensor, Tensor]:
    shape = (*leading, batch, HIDDEN)
    if kind == "lstm":
        return torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    return torch.randn(shape, dtype=torch.float64)


def as_tuple(state: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return state if isinstance(state, tuple) else (state,)


def requires_grad(state: Tensor | tuple[Tensor, ...]) -> None:
    for tensor in as_tuple(state):
        tensor.requires_grad_(True)


def loss_of(output: Tensor | tuple[Tensor, ...], weights: list[Tensor]) -> Tensor:
    """A scalar that depends on every output element with a different random weight."""
    return sum((o * w).sum() for o, w in zip(as_tuple(output), weights))


def cell_pair(kind: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    reference_type, torch_type, _ = KINDS[kind]
    theirs = torch_type(INPUT, HIDDEN).double()
    ours = reference_type(INPUT, HIDDEN).double().load_from_torch(theirs)
    return ours, theirs


def run_one_step(kind: str) -> tuple[nn.Module, nn.Module, dict[str, Tensor]]:
    """Step both cells on the same input and state and backpropagate the same loss."""
    ours, theirs = cell_pair(kind)
    x = torch.randn(BATCH, INPUT, dtype=torch.float64)
    state = random_state(kind, BATCH)
    weights = [torch.randn(BATCH, HIDDEN, dtype=torch.float64) for _ in as_tuple(state)]
    results: dict[str, Tensor] = {}
    for name, cell in (("ours", ours), ("theirs", theirs)):
        x_ = x.clone().requires_grad_(True)
        state_ = tuple(s.clone().requires_grad_(True) for s in as_tuple(state))
        output = cell(x_, state_ if kind == "lstm" else state_[0])
        loss_of(output, weights).backward()
        for i, o in enumerate(as_tuple(output)):
            results[f"{name}_out{i}"] = o.detach()
        results[f"{name}_grad_x"] = x_.grad
        for i, s in enumerate(state_):
            results[f"{name}_grad_state{i}"] = s.grad
    return ours, theirs, results


# --- one step of a cell ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_cell_matches_torch_cell_outputs_and_input_and_state_gradients(kind: str) -> None:
    _, _, results = run_one_step(kind)
    keys = [k.removeprefix("ours_") for k in results if k.startswith("ours_")]
    assert len(keys) == (5 if kind == "lstm" else 3)  # each output, grad of x, grad of each state part
    for key in keys:
        assert close(results[f"ours_{key}"], results[f"theirs_{key}"]), key


def test_rnn_cell_parameter_gradients_equal_torch_gradients() -> None:
    ours, theirs, _ = run_one_step("rnn")
    w, b = ours.linear.weight.grad, ours.linear.bias.grad
    assert close(w[:, :HIDDEN], theirs.weight_hh.grad)
    assert close(w[:, HIDDEN:], theirs.weight_ih.grad)
    assert close(b, theirs.bias_ih.grad) and close(b, theirs.bias_hh.grad)


def test_lstm_cell_parameter_gradients_equal_torch_gradients_in_forget_input_candidate_output_order() -> None:
    ours, theirs, _ = run_one_step("lstm")
    ours_w = dict(zip("figo", ours.gates.weight.grad.chunk(4)))
    ours_b = dict(zip("figo", ours.gates.bias.grad.chunk(4)))
    torch_w_ih = dict(zip("ifgo", theirs.weight_ih.grad.chunk(4)))
    torch_w_hh = dict(zip("ifgo", theirs.weight_hh.grad.chunk(4)))
    torch_b_ih = dict(zip("ifgo", theirs.bias_ih.grad.chunk(4)))
    torch_b_hh = dict(zip("ifgo", theirs.bias_hh.grad.chunk(4)))
    for gate in "figo":
        assert close(ours_w[gate][:, :HIDDEN], torch_w_hh[gate]), gate
        assert close(ours_w[gate][:, HIDDEN:], torch_w_ih[gate]), gate
        assert close(ours_b[gate], torch_b_ih[gate]) and close(ours_b[gate], torch_b_hh[gate]), gate


def test_gru_cell_parameter_gradients_equal_torch_gradients_with_hidden_candidate_bias_kept_apart() -> None:
    ours, theirs, _ = run_one_step("gru")
    ours_w = dict(zip("rz", ours.gates.weight.grad.chunk(2)))
    ours_b = dict(zip("rz", ours.gates.bias.grad.chunk(2)))
    torch_w_ih = dict(zip("rzn", theirs.weight_ih.grad.chunk(3)))
    torch_w_hh = dict(zip("rzn", theirs.weight_hh.grad.chunk(3)))
    torch_b_ih = dict(zip("rzn", theirs.bias_ih.grad.chunk(3)))
    torch_b_hh = dict(zip("rzn", theirs.bias_hh.grad.chunk(3)))
    for gate in "rz":
        assert close(ours_w[gate][:, :HIDDEN], torch_w_hh[gate]), gate
        assert close(ours_w[gate][:, HIDDEN:], torch_w_ih[gate]), gate
        assert close(ours_b[gate], torch_b_ih[gate]) and close(ours_b[gate], torch_b_hh[gate]), gate
    assert close(ours.candidate_x.weight.grad, torch_w_ih["n"])
    assert close(ours.candidate_x.bias.grad, torch_b_ih["n"])
    assert close(ours.candidate_h.weight.grad, torch_w_hh["n"])
    assert close(ours.candidate_h.bias.grad, torch_b_hh["n"])
    # b_hn is scaled by r_t, b_in is not: their gradients differ, so they cannot be merged.
    assert not close(torch_b_ih["n"], torch_b_hh["n"])


# --- unrolling over a padded batch -------------------------------------------------------


def run_torch_layer(
    layer: nn.RNNBase, x: Tensor, lengths: Tensor, state: Tensor | tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor]]:
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    output, final = layer(packed, state)
    output, _ = pad_packed_sequence(output, batch_first=True, total_length=x.size(1))
    return output, final


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("kind", KINDS)
def test_run_cell_matches_fused_torch_layer_on_packed_padded_batch(kind: str, reverse: bool) -> None:
    torch.manual_seed(1)
    reference_type, _, layer_type = KINDS[kind]
    layer = layer_type(INPUT, HIDDEN, batch_first=True, bidirectional=reverse).double()
    cell = reference_type(INPUT, HIDDEN).double().load_from_torch(layer, reverse=reverse)
    direction = 1 if reverse else 0

    x = torch.randn(BATCH, SEQ, INPUT, dtype=torch.float64)
    # torch's initial state is (layers · directions, batch, hidden); ours is this direction's slice.
    torch_state = random_state(kind, BATCH, 2 if reverse else 1)
    our_state = tuple(s[direction] for s in as_tuple(torch_state))
    weights = [torch.randn(BATCH, HIDDEN, dtype=torch.float64) for _ in our_state]
    out_weights = torch.randn(BATCH, SEQ, HIDDEN, dtype=torch.float64)

    x_ours, x_theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    requires_grad(our_state)
    requires_grad(torch_state)
    initial = our_state if kind == "lstm" else our_state[0]
    ours_out, ours_final = run_cell(cell, x_ours, LENGTHS, initial, reverse)
    theirs_out, theirs_final = run_torch_layer(layer, x_theirs, LENGTHS, torch_state)
    theirs_out = theirs_out[..., direction * HIDDEN : (direction + 1) * HIDDEN]
    theirs_final = tuple(s[direction] for s in as_tuple(theirs_final))

    padding = torch.arange(SEQ).unsqueeze(0) >= LENGTHS.unsqueeze(1)
    assert close(ours_out, theirs_out)  # real positions, and zeros at the padding
    assert (ours_out[padding] == 0).all()
    for ours, theirs in zip(as_tuple(ours_final), theirs_final):
        assert close(ours, theirs)

    (loss_of(ours_out, [out_weights]) + loss_of(ours_final, weights)).backward()
    (loss_of(theirs_out, [out_weights]) + loss_of(theirs_final, weights)).backward()
    assert close(x_ours.grad, x_theirs.grad)
    assert (x_ours.grad[padding] == 0).all()
    for ours, theirs in zip(as_tuple(our_state), as_tuple(torch_state)):
        assert close(ours.grad, theirs.grad[direction])


def test_stacked_run_cell_reproduces_bidirectional_two_layer_torch_lstm() -> None:
    torch.manual_seed(2)
    lstm = nn.LSTM(INPUT, HIDDEN, num_layers=2, bidirectional=True, batch_first=True).double()
    x = torch.randn(BATCH, SEQ, INPUT, dtype=torch.float64)
    h0, c0 = random_state("lstm", BATCH, 4)  # index = 2 · layer + direction

    layer_input, h_n, c_n = x, [], []
    for layer in range(2):
        outputs = []
        for direction, reverse in enumerate([False, True]):
            input_size = INPUT if layer == 0 else 2 * HIDDEN
            cell = LSTMCell(input_size, HIDDEN).double().load_from_torch(lstm, layer=layer, reverse=reverse)
            k = 2 * layer + direction
            output, (h, c) = run_cell(cell, layer_input, LENGTHS, (h0[k], c0[k]), reverse=reverse)
            outputs.append(output)
            h_n.append(h)
            c_n.append(c)
        layer_input = torch.cat(outputs, dim=2)

    theirs_out, (theirs_h, theirs_c) = run_torch_layer(lstm, x, LENGTHS, (h0, c0))
    assert close(layer_input, theirs_out)
    assert close(torch.stack(h_n), theirs_h)
    assert close(torch.stack(c_n), theirs_c)


# --- loading weights ---------------------------------------------------------------------


def test_load_from_torch_rejects_other_cell_types_shapes_layers_and_directions() -> None:
    with pytest.raises(TypeError):
        LSTMCell(INPUT, HIDDEN).load_from_torch(nn.GRUCell(INPUT, HIDDEN))
    with pytest.raises(ValueError):
        LSTMCell(INPUT, HIDDEN).load_from_torch(nn.LSTMCell(INPUT + 1, HIDDEN))
    with pytest.raises(ValueError):
        GRUCell(INPUT, HIDDEN).load_from_torch(nn.GRU(INPUT, HIDDEN), layer=1)
    with pytest.raises(ValueError):
        GRUCell(INPUT, HIDDEN).load_from_torch(nn.GRU(INPUT, HIDDEN), reverse=True)
    with pytest.raises(ValueError):
        RNNCell(INPUT, HIDDEN).load_from_torch(nn.RNN(INPUT, HIDDEN, nonlinearity="relu"))
    with pytest.raises(ValueError, match="single layer"):  # a torch cell has no layer 1
        LSTMCell(INPUT, HIDDEN).load_from_torch(nn.LSTMCell(INPUT, HIDDEN), layer=1)
    with pytest.raises(ValueError, match="proj_size"):  # h is projected: other equations
        LSTMCell(INPUT, HIDDEN).load_from_torch(nn.LSTM(INPUT, HIDDEN + 1, proj_size=HIDDEN))


@pytest.mark.parametrize("kind", KINDS)
def test_run_cell_starts_from_zeros_and_handles_an_empty_sequence(kind: str) -> None:
    torch.manual_seed(5)
    cell = KINDS[kind][0](INPUT, HIDDEN).double()
    x = torch.randn(BATCH, SEQ, INPUT, dtype=torch.float64)
    lengths = torch.full((BATCH,), SEQ)
    zeros = cell.zero_state(BATCH, x)
    for a, b in zip(as_tuple(run_cell(cell, x, lengths)[1]),
                    as_tuple(run_cell(cell, x, lengths, zeros)[1])):
        assert torch.equal(a, b)
    assert all(not z.any() and z.dtype == torch.float64 for z in as_tuple(zeros))
    output, state = run_cell(cell, x[:, :0], torch.zeros(BATCH, dtype=torch.long))
    assert output.shape == (BATCH, 0, HIDDEN)
    assert all(not s.any() for s in as_tuple(state))


def test_run_cell_rejects_inputs_of_the_wrong_shape_or_lengths() -> None:
    cell = LSTMCell(INPUT, HIDDEN)
    x = torch.randn(BATCH, SEQ, INPUT)
    with pytest.raises(ValueError, match="batch, seq, input_size"):
        run_cell(cell, x[:, 0], torch.full((BATCH,), SEQ))
    with pytest.raises(ValueError, match="lengths must be"):
        run_cell(cell, x, torch.full((BATCH + 1,), SEQ))
    with pytest.raises(ValueError, match=r"lie in \[0, 6\]"):
        run_cell(cell, x, torch.full((BATCH,), SEQ + 1))


@pytest.mark.parametrize("kind", KINDS)
def test_load_from_torch_reads_bias_free_torch_modules_as_zero_biases(kind: str) -> None:
    torch.manual_seed(3)
    reference_type, torch_type, _ = KINDS[kind]
    theirs = torch_type(INPUT, HIDDEN, bias=False).double()
    ours = reference_type(INPUT, HIDDEN).double().load_from_torch(theirs)
    x = torch.randn(BATCH, INPUT, dtype=torch.float64)
    state = random_state(kind, BATCH)
    for o, t in zip(as_tuple(ours(x, state)), as_tuple(theirs(x, state))):
        assert close(o, t)
