"""Worked solutions of the course's exercises (ldm_mini/exercises.py), written from the equations, the way a
student would, without calling the library functions they re-implement.

The tests grade each one (tests/test_exercises.py), inject them into the blanks of the exercise notebooks
(tests/test_notebooks.py), and grade this very file through the command line:

    python -m ldm_mini.exercises check tests/exercise_solutions.py

Each function's source is what a notebook's blank gets, so each uses only the imports of the notebooks'
first cell (math, torch, torch.nn.functional as F).
"""

import math

import torch
import torch.nn.functional as F


# --- 01 the noise schedule ---------------------------------------------------------------------------------
def scaled_linear_betas(beta_start, beta_end, T):
    return torch.linspace(beta_start**0.5, beta_end**0.5, T) ** 2  # linear in sqrt(beta)


def cosine_betas(T, s=0.008, max_beta=0.999):
    def alpha_bar(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)])


def alphas_cumprod(betas):
    return torch.cumprod(1 - betas, dim=0)


def q_sample(x0, t, noise, alphas_cumprod):
    ab = alphas_cumprod[t].to(x0.dtype).reshape(-1, *[1] * (x0.dim() - 1))  # (B, 1, 1, 1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


# --- 02 the autoencoder ------------------------------------------------------------------------------------
def posterior_sample(moments, noise):
    mean, logvar = moments.chunk(2, dim=1)
    return mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise


def posterior_kl(moments):
    mean, logvar = moments.chunk(2, dim=1)
    logvar = logvar.clamp(-30, 20)
    return 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))


def scale_factor(z):
    return 1 / z.std()


# --- 03 attention ------------------------------------------------------------------------------------------
def attention(q, k, v):
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)  # (..., N, L)
    return weights @ v


def cross_attention(attn, x, context=None):
    context = x if context is None else context
    b, n, _ = x.shape

    def heads(y):  # (B, L, heads * d) -> (B, heads, L, d)
        return y.reshape(b, y.shape[1], attn.heads, -1).permute(0, 2, 1, 3)

    q, k, v = heads(attn.to_q(x)), heads(attn.to_k(context)), heads(attn.to_v(context))
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return attn.to_out((weights @ v).permute(0, 2, 1, 3).reshape(b, n, -1))


# --- 04 the UNet's parts -----------------------------------------------------------------------------------
def timestep_embedding(t, dim, max_period=10000.0):
    half = dim // 2
    freqs = max_period ** (-torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def resblock(block, x, emb):
    h = block.conv1(F.silu(block.norm1(x)))
    h = h + block.time_emb_proj(emb)[:, :, None, None]
    h = block.conv2(F.silu(block.norm2(h)))
    return (x if block.conv_shortcut is None else block.conv_shortcut(x)) + h


# --- 05 sampling -------------------------------------------------------------------------------------------
def guided_eps(m, x, t, cond=None, uncond=None, scale=1.0):
    if scale == 1.0:
        return m.predict_noise(x, t, cond)
    t = torch.as_tensor(t).expand(2 * x.shape[0])
    e_u, e_c = m.predict_noise(torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(2)
    return e_u + scale * (e_c - e_u)


def ddim_sigma(a_t, a_prev, eta):
    return eta * torch.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))


def ddim_step(z, eps, a_t, a_prev, sigma=0.0, noise=None, clip=False):
    x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    if clip:
        x0 = x0.clamp(-1, 1)
    z_next = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps
    if noise is not None:
        z_next = z_next + sigma * noise
    return z_next, x0


def ddpm_step(z, eps, a_t, a_prev, noise=None, clip=False):
    alpha = a_t / a_prev
    beta = 1 - alpha
    x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    if clip:
        x0 = x0.clamp(-1, 1)
    mean = a_prev.sqrt() * beta / (1 - a_t) * x0 + alpha.sqrt() * (1 - a_prev) / (1 - a_t) * z
    if noise is None:
        return mean, x0
    var = (1 - a_prev) / (1 - a_t) * beta
    return mean + var.clamp(min=1e-20).sqrt() * noise, x0


def plms_eps(eps, old_eps):
    history = [eps, *old_eps[::-1][:3]]  # newest first
    weights = {
        1: [1],
        2: [3 / 2, -1 / 2],
        3: [23 / 12, -16 / 12, 5 / 12],
        4: [55 / 24, -59 / 24, 37 / 24, -9 / 24],
    }
    return sum(w * e for w, e in zip(weights[len(history)], history, strict=True))


def euler_step(x, eps, sigma, sigma_next):
    x0 = x - sigma * eps
    return x0 + sigma_next * eps, x0


# --- 09 training -------------------------------------------------------------------------------------------
def eps_loss(m, z0, t, noise, context, snr_gamma=5.0):
    ab = m.alphas_cumprod[t].to(z0.dtype)[:, None, None, None]
    z_t = ab.sqrt() * z0 + (1 - ab).sqrt() * noise
    per_sample = ((m.predict_noise(z_t, t, context) - noise) ** 2).mean(dim=(1, 2, 3))
    if snr_gamma is None:
        return per_sample.mean()
    snr = m.alphas_cumprod[t] / (1 - m.alphas_cumprod[t])
    return (torch.clamp(snr, max=snr_gamma) / snr * per_sample).mean()


def train_step(model, opt, loss, max_grad_norm=None):
    opt.zero_grad()
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    return loss.item()
