"""qpy.local"""
