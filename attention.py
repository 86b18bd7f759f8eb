"""
The attention blocks of DANIE (Li et al., "Dual Attention Encoder with Joint Preservation for Medical
Image Segmentation"), Sec. 3.3 and 3.4:

- SAP, self-attentional perception (Sec. 3.3, Eq. 1): the multi-head self-attention of MaxViT. It is not
  re-implemented here: DANIE uses timm's MaxViT stages as they are (block and grid attention, each
  softmax(QK^T / sqrt(d) + B) V, Eq. 1 plus MaxViT's scale and relative position bias), so the ImageNet
  weights load unchanged. See `timm.models.maxxvit.AttentionCl` / `PartitionAttentionCl`; model.py
  builds the stream with `timm.create_model(..., features_only=True)`.
- HAP, hierarchical-attentional perception (Sec. 3.3, Eq. 2-5): channel attention, spatial attention and
  dynamic calibration on the convolutional stream; the max and avg branches run together, batched.
- ES, enhancing self-attentional perceptron (Sec. 3.4, Eq. 6-7): channel self-attention on SAP features.
- EH, enhancing hierarchical-attentional perceptron (Sec. 3.4, Eq. 8-9): global context on HAP features.
- ConvBlock: two 3x3 conv + BN + GELU (the definition under Eq. 11).

Depends on torch only.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- helpers


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
    """A^c = sigma(MLP(P^s)) on spatially pooled descriptors (..., C), the MLP shared by both branches (Eq. 2)."""

    def __init__(self, C, reduction=16):
        super().__init__()
        # NOTE(impl): MLP = C->C/16, ReLU, C/16->C, shared by both branches (CBAM's): the paper gives no width.
        hidden = max(C // reduction, 1)
        self.mlp = nn.Sequential(nn.Linear(C, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, C))

    def forward(self, P_s):
        return torch.sigmoid(self.mlp(P_s))  # A^c: one C-vector per pooled descriptor


class SpatialAttention(nn.Module):
    """A^s = sigma(Conv(P^c)) on channel-pooled maps (N,1,H,W): a 1x1 convolution (Eq. 3)."""

    def __init__(self):
        super().__init__()
        # NOTE(impl): one 1x1 conv (1->1 channel) shared by the max and avg branches, as the channel MLP is shared.
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, P_c):
        return torch.sigmoid(self.conv(P_c))  # A^s: (N,1,H,W)


class DynamicCalibration(nn.Module):
    """O_d = w_max O_max + w_avg O_avg with learnable scalars (Eq. 4); a fixed average when switched off.

    Eq. 4 is linear, so HAP applies it to the spatial means of O_max and O_avg, the only part A_d needs.
    """

    def __init__(self, learnable=True):
        super().__init__()
        # NOTE(impl): w_max and w_avg start at 0.5: the calibrated block begins as the plain average (Table 6's
        # 'Dcal off').
        w = torch.full((2,), 0.5)
        if learnable:
            self.w = nn.Parameter(w)
        else:
            self.register_buffer('w', w)

    def forward(self, O):
        # the weighted sum of the two branches is a 1x1 convolution from 2 channels to 1: one op, one op back
        return F.conv1d(O, self.w.view(1, 2, 1)).squeeze(1)  # Eq. (4): O (B,2,C) holds (O_max, O_avg) -> (B,C)


class HAP(nn.Module):
    """One hierarchical-attentional perception block, Eq. 2-5: O_hap = ConvBlock(A_d * h).

    order='channel_first' is Eq. 2 then Eq. 3 (Table 6, B.3/B.4); 'spatial_first' swaps them (B.1/B.2).
    """

    def __init__(self, C, order='channel_first', calibration=True, spatial_att=True, channel_att=True):
        super().__init__()
        if order not in ('channel_first', 'spatial_first'):
            raise ValueError(f"HAP order must be 'channel_first' or 'spatial_first', got {order!r}")
        if not (spatial_att or channel_att):
            raise ValueError('HAP needs channel or spatial attention (or both); to drop the stream use hap=False')
        self.order = order
        self.channel = ChannelAttention(C) if channel_att else None
        self.spatial = SpatialAttention() if spatial_att else None
        self.calibration = DynamicCalibration(learnable=calibration)
        # NOTE(impl): 1x1 convs on pooled C x 1 x 1 maps (the MLPs, c*, EH's c1_int/c2) are nn.Linear: the same map
        # without the slow conv path.
        self.c = nn.Linear(C, C)  # c* of Eq. 5
        self.block = ConvBlock(C, C)

    def channel_maps(self, P_max, P_avg):
        """A^c of both branches through the shared MLP in one pass (Eq. 2): two (B,C) or (B,C,1,1) pools -> (B,2,C)."""
        B, C = P_max.shape[:2]
        return self.channel(torch.cat([P_max, P_avg], dim=1).view(2 * B, C)).view(B, 2, C)  # (B,2C,...) -> (2B,C)

    def spatial_maps(self, P_max, P_avg):
        """A^s of both branches through the shared 1x1 conv in one pass (Eq. 3): two (B,1,N) pools -> (B,2,N)."""
        P_c = torch.cat([P_max, P_avg], dim=1)  # (B,2,N)
        B, _, N = P_c.shape
        return self.spatial(P_c.view(2 * B, 1, N, 1)).view(B, 2, N)  # the 1x1 conv sees each map alone

    def pooled_O(self, h):
        """The spatial means of O_max and O_avg (Eq. 2-3), (B,2,C), without forming O at full size."""
        # NOTE(impl): only mean(O_d) over H x W reaches A_d, and O = A^c * A^s * h, so mean(O)_c = A^c_c mean(A^s h_c)
        # is taken from pooled maps: the same function without forming the two full-size O.
        N = h.shape[2] * h.shape[3]
        h_flat = h.flatten(2)  # (B,C,N), a view in NCHW and channels_last alike
        if self.spatial is None:  # Table 5 A.3: O = A^c * h in either order
            mean = h_flat.mean(dim=2)  # (B,C)
            return self.channel_maps(h_flat.amax(dim=2), mean) * mean[:, None]  # (B,2,C) * (B,1,C)
        h_T = h_flat.transpose(1, 2)  # (B,N,C)
        if self.channel is None or self.order == 'spatial_first':
            A_s = self.spatial_maps(h_flat.amax(dim=1, keepdim=True), h_flat.mean(dim=1, keepdim=True))  # Eq. (3) on h
            G = torch.bmm(A_s, h_T) / N  # (B,2,N) @ (B,N,C) -> (B,2,C): mean(A^s h) per branch
            if self.channel is None:  # Table 5 A.4: O = A^s * h
                return G
            m_max = A_s[:, :1] * h_flat  # m_max = A^s_max * h: (B,1,N) * (B,C,N)
            A_c = self.channel_maps(m_max.amax(dim=2), G[:, 1])  # Eq. (2) on m; mean(m_avg) is G's avg row
            return A_c * G  # (B,2,C)
        # the global average pool is CBAM's avg_pool2d over the whole map: one op back, where mean takes three
        A_c = self.channel_maps(h.amax(dim=(2, 3), keepdim=True), F.avg_pool2d(h, h.shape[2:]))  # Eq. (2) on h: (B,2,C)
        m = A_c[:, :, :, None] * h_flat[:, None]  # m = A^c * h of both branches: (B,2,C,1) * (B,1,C,N) -> (B,2,C,N)
        A_s = self.spatial_maps(m[:, 0].amax(dim=1, keepdim=True), m[:, 1].mean(dim=1, keepdim=True))  # Eq. (3) on m
        return A_c * torch.bmm(A_s, h_T) / N  # (B,2,N) @ (B,N,C) -> (B,2,C): A^c mean(A^s h)

    def forward(self, h):
        O_d = self.calibration(self.pooled_O(h))  # Eq. (4) on the spatial means: (B,2,C) -> (B,C)
        # NOTE(impl): A_d is C x 1 x 1 as the text says, so O_d is average-pooled before the 1x1 conv c*.
        A_d = torch.sigmoid(self.c(O_d))  # (B,C)
        return self.block(A_d.view(*A_d.shape, 1, 1) * h)  # Eq. (5): (B,C,1,1) * (B,C,H,W)


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
            S1 = S.flatten(2)  # (B,C,N), a view in NCHW and channels_last alike
            S2 = S1.transpose(1, 2)  # (B,N,C)
            energy = torch.bmm(S1, S2)  # (B,C,N) @ (B,N,C) -> (B,C,C), symmetric
            # NOTE(impl): Eq. 6 as written, softmax over i of S1_i . S2_j (DANet's code uses max(energy) - energy).
            S3 = S1  # S3 is S_in reshaped to (B,C,N) again
            # NOTE(impl): Eq. 7 as printed sums w_ij S_{3,j}, which collapses to (1 + lambda) S_j; we sum w_ij S_{3,i},
            # DANet's reading, where channel i's weight on channel j mixes the channels.
            if S.is_contiguous() or not S.is_contiguous(memory_format=torch.channels_last):
                # the energy is symmetric, so the softmax over its rows is W_c transposed (w[i,j] at [j,i])
                W_c_T = torch.softmax(energy, dim=2)  # Eq. (6): row j holds w[i,j], summing to 1 over i
                # lambda multiplies the small (C,C) matrix, not the (C,N) product
                es = torch.baddbmm(S3, self.lam * W_c_T, S3)  # Eq. (7): (B,C,C) @ (B,C,N) + S3 -> (B,C,N)
            else:  # the same sum in (B,N,C) order, so a channels_last input gives a channels_last output
                W_c = torch.softmax(energy, dim=1)  # Eq. (6): w[i,j], each column j sums to 1 over i
                es = torch.baddbmm(S2, S2, self.lam * W_c).transpose(1, 2)  # Eq. (7): (B,N,C) @ (B,C,C) + S2
        return es.view(B, C, H, W).to(S_in.dtype)  # (B,C,N) -> (B,C,H,W): es_j = lam sum_i w[i,j] S3_i + S_in,j


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
        k = torch.softmax(self.c1(H_in).reshape(B, H * W, 1), dim=1)  # F_r1, psi: (B,1,H,W) -> (B,N,1)
        A_g = torch.bmm(H_in.flatten(2), k)  # Eq. (8): (B,C,N) @ (B,N,1) -> (B,C,1)
        W_g = torch.sigmoid(self.c2(F.gelu(self.ln(self.c1_int(A_g.view(B, C))))))  # (B,C)
        return W_g.view(B, C, 1, 1) * H_in  # Eq. (9): (B,C) -> (B,C,1,1), broadcast over H x W
