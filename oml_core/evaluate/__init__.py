"""Measuring a fingerprinted model: does it answer its keys, and is it still the base model?"""
