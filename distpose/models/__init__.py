"""Pose networks: plain nn.Modules, no distribution code (see factory.build_backbone)."""
