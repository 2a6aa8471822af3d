"""qpy.smtp"""
