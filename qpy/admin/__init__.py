"""qpy.admin"""
