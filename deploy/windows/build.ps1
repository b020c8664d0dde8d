# Builds TikTrueSetup.exe on a Windows PC (x64, Python 3.11, Inno Setup 6):
#   powershell -ExecutionPolicy Bypass -File deploy\windows\build.ps1 [-Obfuscate]
# 1. a virtual environment with torch's CPU build (the PyPI wheel of torch for Windows is it)
#    and TikTrue with its bundle tools (PyInstaller, PyArmor);
# 2. the PyInstaller bundle dist\tiktrue (tiktrue.exe, service_runner.exe, main_app.exe), the
#    same spec as `make bundle` on Linux; -Obfuscate: PyArmor first (a licence is needed for
#    the whole package: its trial refuses large modules);
# 3. Inno Setup's compiler: dist\TikTrueSetup.exe.
# Written for Windows and not yet run (README, "Install").
param([switch]$Obfuscate)
$ErrorActionPreference = "Stop"
Set-Location (Join-Path $PSScriptRoot "..\..")

py -3.11 -m venv .venv-win
$py = ".\.venv-win\Scripts\python.exe"
& $py -m pip install --upgrade pip
& $py -m pip install "torch==2.13.0"
& $py -m pip install -e ".[bundle]"

$src = "src"
if ($Obfuscate) {
    if (Test-Path build\obfuscated) { Remove-Item -Recurse -Force build\obfuscated }
    & $py -m pyarmor.cli gen --recursive --output build\obfuscated src\tiktrue
    $src = "build\obfuscated"
}
$env:TIKTRUE_BUNDLE_SRC = $src
& $py -m PyInstaller --noconfirm --distpath dist --workpath build\pyinstaller deploy\pyinstaller\tiktrue.spec
$version = (& dist\tiktrue\tiktrue.exe --version).Trim()

$iscc = Join-Path ${env:ProgramFiles(x86)} "Inno Setup 6\ISCC.exe"
if (-not (Test-Path $iscc)) { throw "Inno Setup 6 is not installed (ISCC.exe not found at $iscc)" }
& $iscc "/DAppVersion=$version" deploy\windows\tiktrue.iss
Write-Host "built dist\TikTrueSetup.exe ($version)"
