import pytest
import torch

from misa.nn import hadamard_transform


def sylvester(n: int) -> torch.Tensor:
    """The explicit Hadamard matrix by Kronecker products, independent of the butterfly."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    return h


@pytest.mark.parametrize("n", [1, 2, 8, 128])
def test_matches_explicit_matrix(n):
    x = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    expected = x @ sylvester(n) * n ** -0.5
    got = hadamard_transform(x.float())
    assert torch.allclose(got.double(), expected, atol=1e-5)


def test_is_orthogonal_and_keeps_dot_products():
    n = 64
    rows = hadamard_transform(torch.eye(n))           # the transform of the basis: the matrix itself
    assert torch.allclose(rows @ rows.t(), torch.eye(n), atol=1e-6)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(10, n, generator=g), torch.randn(7, n, generator=g)
    assert torch.allclose(hadamard_transform(q) @ hadamard_transform(k).t(), q @ k.t(), atol=1e-4)


def test_scale_and_dtype():
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(2)).bfloat16()
    y = hadamard_transform(x, scale=1.0)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), x.float() @ sylvester(16).float(), atol=0.1)


@pytest.mark.parametrize("bad, match", [(torch.randn(4, 12), "x \\(last dimension\\)"),
                                        (torch.ones(4, 8, dtype=torch.int32), "^x:"),
                                        ([1.0, 2.0], "^x:")])
def test_bad_input_names_x(bad, match):
    with pytest.raises(ValueError, match=match):
        hadamard_transform(bad)
