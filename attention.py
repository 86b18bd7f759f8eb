"""
The attention blocks of DANIE (Li et al., "Dual Attention Encoder with Joint Preservation for Medical
Image Segmentation"), Sec. 3.3 and 3.4, each written as the paper prints its equations:

- SAP, self-attentional perception (Sec. 3.3, Eq. 1): the multi-head self-attention of MaxViT. It is not
  re-implemented here: DANIE uses timm's MaxViT stages as they are (block and grid attention, each
  softmax(QK^T / sqrt(d) + B) V, Eq. 1 plus MaxViT's scale and relative position bias), so the ImageNet
  weights load unchanged. See `timm.models.maxxvit.AttentionCl` / `PartitionAttentionCl`; model.py
  builds the stream with `timm.create_model(..., features_only=True)`.
- HAP, hierarchical-attentional perception (Sec. 3.3, Eq. 2-5): channel attention, spatial attention and
  dynamic calibration on the convolutional stream, a max-pooling and an average-pooling branch.
- ES, enhancing self-attentional perceptron (Sec. 3.4, Eq. 6-7): channel self-attention on SAP features.
- EH, enhancing hierarchical-attentional perceptron (Sec. 3.4, Eq. 8-9): global context on HAP features.
- ConvBlock: two 3x3 conv + BN + GELU (the definition under Eq. 11).

Depends on torch only.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- helpers

POOLS = {'max': torch.amax, 'avg': torch.mean}  # the two branches of Eq. 2-4, by the pooling they use


def conv_bn_gelu(c_in, c_out, stride=1):
    """3x3 conv -> BN -> GELU, the unit that ConvBlock stacks twice."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),  # bias is redundant before BN
        nn.BatchNorm2d(c_out),
        nn.GELU(),
    )


class ConvBlock(nn.Sequential):
    """Two 3x3 conv layers, each followed by BN and GELU (Sec. 3.4, below Eq. 11)."""

    def __init__(self, c_in, c_out):
        super().__init__(conv_bn_gelu(c_in, c_out), conv_bn_gelu(c_out, c_out))


# ---- blocks: HAP, hierarchical-attentional perception (Sec. 3.3)


class ChannelAttention(nn.Module):
    """A^c = sigma(MLP(P^s(x))) in R^{C x 1 x 1}: the map x pooled over H x W, then a shared MLP (Eq. 2)."""

    def __init__(self, C, reduction=16):
        super().__init__()
        # NOTE(impl): MLP = C->C/16, ReLU, C/16->C, shared by both branches (CBAM's): the paper gives no width.
        hidden = max(C // reduction, 1)
        self.mlp = nn.Sequential(nn.Linear(C, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, C))

    def forward(self, x, pool):
        B, C = x.shape[:2]
        P_s = POOLS[pool](x, dim=(2, 3))  # P^s: (B,C,H,W) -> (B,C)
        A_c = torch.sigmoid(self.mlp(P_s))  # (B,C)
        return A_c.view(B, C, 1, 1)  # (B,C) -> (B,C,1,1)


class SpatialAttention(nn.Module):
    """A^s = sigma(Conv(P^c(x))) in R^{1 x H x W}: the map x pooled over channels, then a 1x1 convolution (Eq. 3)."""

    def __init__(self):
        super().__init__()
        # NOTE(impl): one 1x1 conv (1->1 channel) shared by the max and avg branches, as the channel MLP is shared.
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x, pool):
        P_c = POOLS[pool](x, dim=1, keepdim=True)  # P^c: (B,C,H,W) -> (B,1,H,W)
        return torch.sigmoid(self.conv(P_c))  # A^s: (B,1,H,W)


class DynamicCalibration(nn.Module):
    """O_d = w_max O_max + w_avg O_avg with learnable scalars (Eq. 4); a fixed average when switched off."""

    def __init__(self, learnable=True):
        super().__init__()
        # NOTE(impl): w_max and w_avg start at 0.5: the calibrated block begins as the plain average (Table 6's
        # 'Dcal off').
        w = torch.full((2,), 0.5)  # (w_max, w_avg)
        if learnable:
            self.w = nn.Parameter(w)
        else:
            self.register_buffer('w', w)

    def forward(self, O_max, O_avg):
        w_max, w_avg = self.w
        return w_max * O_max + w_avg * O_avg  # Eq. (4)


class HAP(nn.Module):
    """One hierarchical-attentional perception block, Eq. 2-5: O_hap = ConvBlock(A_d * h).

    order='channel_first' is Eq. 2 then Eq. 3 (Table 6, B.3/B.4); 'spatial_first' swaps them (B.1/B.2).
    Table 5 switches one attention off (A.3: no spatial, A.4: no channel); the other one stays.
    """

    def __init__(self, C, order='channel_first', calibration=True, spatial_att=True, channel_att=True):
        super().__init__()
        self.order = order
        self.channel = ChannelAttention(C) if channel_att else None
        self.spatial = SpatialAttention() if spatial_att else None
        self.calibration = DynamicCalibration(learnable=calibration)
        # NOTE(impl): 1x1 convs on pooled C x 1 x 1 maps (the MLPs, c*, EH's c1_int/c2) are nn.Linear: the same map
        # on a (B,C) vector.
        self.c = nn.Linear(C, C)  # c* of Eq. 5
        self.block = ConvBlock(C, C)

    def attend(self, attention, x, pool):
        """A * x, or x itself where Table 5 switches this attention off."""
        return x if attention is None else attention(x, pool) * x

    def refine(self, h, pool):
        """O of one branch (pool 'max' or 'avg'): channel, then spatial attention; or spatial first (Table 6)."""
        if self.order == 'channel_first':
            m = self.attend(self.channel, h, pool)  # Eq. (2): m = A^c * h, (B,C,1,1) * (B,C,H,W)
            return self.attend(self.spatial, m, pool)  # Eq. (3): O = A^s * m, (B,1,H,W) * (B,C,H,W)
        m = self.attend(self.spatial, h, pool)  # Eq. (3) on h
        return self.attend(self.channel, m, pool)  # Eq. (2) on its output

    def forward(self, h):
        O_max = self.refine(h, 'max')  # Eq. (2)-(3), the max-pooling branch: (B,C,H,W)
        O_avg = self.refine(h, 'avg')  # Eq. (2)-(3), the average-pooling branch: (B,C,H,W)
        O_d = self.calibration(O_max, O_avg)  # Eq. (4)
        # NOTE(impl): A_d is C x 1 x 1 as the text says, so O_d is average-pooled before the 1x1 conv c*.
        A_d = torch.sigmoid(self.c(O_d.mean(dim=(2, 3))))  # sigma(c* O_d): (B,C)
        return self.block(A_d[:, :, None, None] * h)  # Eq. (5): (B,C,1,1) * (B,C,H,W)


# ---- blocks: the Joint Preservation components ES and EH (Sec. 3.4)


class ES(nn.Module):
    """Enhancing self-attentional perceptron: channel self-attention on SAP features (Eq. 6-7, DANet's CAM)."""

    def __init__(self):
        super().__init__()
        self.lam = nn.Parameter(torch.zeros(1))  # lambda of Eq. 7, learnt from 0 so ES starts as the identity

    def forward(self, S_in):
        B, C, H, W = S_in.shape
        # NOTE(impl): the C x C energies reach 6e4 at init, fp16's limit, so ES runs in fp32 under autocast (fp64 stays
        # fp64); train.py leaves TF32 matmuls off, so training and evaluation form them alike, in IEEE fp32.
        with torch.autocast(device_type='cuda' if S_in.is_cuda else 'cpu', enabled=False):
            S = S_in if S_in.dtype == torch.float64 else S_in.float()
            S1 = S.reshape(B, C, H * W)  # (B,C,N)
            S2 = S1.transpose(1, 2)  # (B,N,C)
            energy = torch.bmm(S1, S2)  # S_{1,i} . S_{2,j}: (B,C,N) @ (B,N,C) -> (B,C,C)
            # NOTE(impl): Eq. 6 as written, softmax over i of S1_i . S2_j (DANet's code uses max(energy) - energy).
            W_c = torch.softmax(energy, dim=1)  # Eq. (6): w[i,j], each column j sums to 1 over i
            S3 = S.reshape(B, C, H * W)  # (B,C,N)
            # NOTE(impl): Eq. 7 as printed sums w_ij S_{3,j}, which collapses to (1 + lambda) S_j; we sum w_ij S_{3,i},
            # DANet's reading, where channel i's weight on channel j mixes the channels.
            mixed = torch.bmm(W_c.transpose(1, 2), S3)  # sum_i w_ij S_{3,i}: (B,C,C)^T @ (B,C,N) -> (B,C,N)
            es = self.lam * mixed + S3  # Eq. (7)
        return es.reshape(B, C, H, W).to(S_in.dtype)  # (B,C,N) -> (B,C,H,W)


class EH(nn.Module):
    """Enhancing hierarchical-attentional perceptron: context modelling (Eq. 8) and integration (Eq. 9)."""

    def __init__(self, C, reduction=4):
        super().__init__()
        hidden = max(C // reduction, 1)
        self.c1 = nn.Conv2d(C, 1, 1)  # c1 of Eq. 8: one attention logit per position
        # NOTE(impl): Eq. 9 reuses the name c1 for a second conv: here c1_int (C->C/4, GCNet's ratio), c2 (C/4->C).
        self.c1_int = nn.Linear(C, hidden)
        self.ln = nn.LayerNorm(hidden)  # GCNet's LayerNorm over the C/4 x 1 x 1 bottleneck
        self.c2 = nn.Linear(hidden, C)

    def forward(self, H_in):
        B, C, H, W = H_in.shape
        k = torch.softmax(self.c1(H_in).reshape(B, H * W, 1), dim=1)  # psi(F_r1(c1 * H_in)): (B,1,H,W) -> (B,N,1)
        V = H_in.reshape(B, C, H * W)  # F_r2(H_in): (B,C,H,W) -> (B,C,N)
        A_g = torch.bmm(V, k).view(B, C)  # Eq. (8): (B,C,N) @ (B,N,1) -> (B,C,1) -> (B,C)
        z = F.gelu(self.ln(self.c1_int(A_g)))  # GELU(LN(c1 * A_g)): (B,C/4)
        W_g = torch.sigmoid(self.c2(z))  # (B,C)
        return W_g[:, :, None, None] * H_in  # Eq. (9): (B,C,1,1) * (B,C,H,W)
