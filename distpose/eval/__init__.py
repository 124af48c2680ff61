"""Evaluation: PCK, HRNet accuracy, COCO OKS AP via pycocotools, skeleton drawings."""
