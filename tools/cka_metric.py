"""Linear CKA (centred kernel alignment) between layer representations, accumulated over minibatches.

CKA compares two layers through the similarity structure they induce on the same examples: with Gram
matrices K = X X^T and L = Y Y^T of n examples, CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)). It is 1 for
identical representations and does not change under an orthogonal transform or an isotropic scaling of
either one, so layers of any width and layout (CNN maps, token sequences) can be compared.

Minibatch CKA (Nguyen, Raghu and Kornblith 2021, "Do wide and deep networks learn the same things?") averages
HSIC over minibatches before taking the ratio, so only n x n Gram matrices of one minibatch are ever held. It
uses the unbiased HSIC estimator (Song et al. 2012), whose mean over minibatches does not drift with the
minibatch size the way the biased one does. The biased estimator is kept for comparison: with one minibatch
it is the classic full-batch linear CKA of Kornblith et al. 2019.

Representations are flattened per example (all channels and positions), as both papers do: pooling would
discard where a feature fires, which is much of what distinguishes a CNN map from a token sequence.
Everything is computed in float64: Gram entries of wide layers are large and the estimator takes differences.
"""
import torch


def linear_gram(features):
    """K = X X^T of a batch of features (n, ...), flattened per example, in float64."""
    flat = features.reshape(features.shape[0], -1).to(torch.float64)
    return flat @ flat.T


def hsic_unbiased(gram_x, gram_y):
    """Unbiased HSIC of two n x n Gram matrices (n >= 4), Song et al. 2012, eq. 5:
    [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)), K~ and L~ with zeroed diagonals."""
    n = gram_x.shape[0]
    if n < 4:
        raise ValueError(f"the unbiased HSIC estimator needs at least 4 examples per minibatch, got {n}")
    k_tilde = gram_x - torch.diag(torch.diagonal(gram_x))
    l_tilde = gram_y - torch.diag(torch.diagonal(gram_y))
    trace = (k_tilde * l_tilde).sum()  # tr(K~ L~), both symmetric
    sums = k_tilde.sum() * l_tilde.sum() / ((n - 1) * (n - 2))
    cross = 2.0 / (n - 2) * (k_tilde.sum(0) @ l_tilde.sum(1))  # 1' K~ L~ 1
    return (trace + sums - cross) / (n * (n - 3))


def hsic_biased(gram_x, gram_y):
    """Biased HSIC: tr(K H L H) / (n - 1)^2 with the centring matrix H = I - 11'/n."""
    n = gram_x.shape[0]
    centring = torch.eye(n, dtype=gram_x.dtype, device=gram_x.device) - 1.0 / n
    return ((centring @ gram_x @ centring) * gram_y).sum() / (n - 1) ** 2


class MinibatchCKA:
    """CKA between every row layer and every column layer (e.g. teacher x student), from minibatches.

    `update(rows, cols)` takes one minibatch's features of each layer (the same examples for all); `value()`
    is the (rows x cols) matrix mean_b HSIC(K_b, L_b) / sqrt(mean_b HSIC(K_b, K_b) mean_b HSIC(L_b, L_b)).
    """

    def __init__(self, unbiased=True):
        self.hsic = hsic_unbiased if unbiased else hsic_biased
        self.cross = self.row_self = self.col_self = None
        self.batches = 0

    def update(self, rows, cols):
        row_grams = [linear_gram(x) for x in rows]
        col_grams = [linear_gram(y) for y in cols]
        cross = torch.stack([torch.stack([self.hsic(row, col) for col in col_grams]) for row in row_grams])
        row_self = torch.stack([self.hsic(row, row) for row in row_grams])
        col_self = torch.stack([self.hsic(col, col) for col in col_grams])
        if self.batches == 0:
            self.cross, self.row_self, self.col_self = cross, row_self, col_self
        else:
            self.cross += cross
            self.row_self += row_self
            self.col_self += col_self
        self.batches += 1

    def value(self):
        """The CKA matrix (float64); the 1/batches of the three means cancels in the ratio."""
        if self.batches == 0:
            raise ValueError("MinibatchCKA.value() before any update()")
        return self.cross / torch.sqrt(self.row_self[:, None] * self.col_self[None, :])
