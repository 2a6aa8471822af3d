"""qpy.send"""
