"""qpy.auth"""
