"""The detector as ``nn.Module``s: backbones, the scored RPN, the ORE RoI head with its
prototype store and clustering loss, the energy and the relabeller, and the Weibull fit
with its file format. Nothing here reads files of weights or chooses a device; the one
cross-process step (the prototype store gathering features) goes through
:mod:`ore.contrastive.distributed`, which is the identity in one process."""
