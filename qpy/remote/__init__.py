"""qpy.remote"""
