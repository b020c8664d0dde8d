; TikTrue's Windows installer, TikTrueSetup.exe (Inno Setup 6).
; Built on a Windows PC by deploy\windows\build.ps1 after the PyInstaller bundle (dist\tiktrue).
; It has not been compiled or run yet: Inno Setup's compiler runs on Windows only, and the
; project's machines run Linux (README, "Install").
;
; What it does: the bundle into Program Files; the node installed as the Windows service
; TiktrueWorkerService (`tiktrue service install`: automatic start, restarted after a crash,
; data in ProgramData\TikTrue) and started; the app (main_app.exe) in the Start menu and, if
; asked, on the desktop; inbound firewall rules for the node (its control channel 7470, the
; block servers of its networks, LAN discovery) and the gateway (8000), on private and domain
; networks. Uninstalling stops and removes the service and the rules; the data stays unless
; the person asks to delete it.

#ifndef AppVersion
  #define AppVersion "0.1.0"
#endif
#define Bundle "..\..\dist\tiktrue"
#define DataDir "{commonappdata}\TikTrue"
#define ControlPort "7470"
#define GatewayPort "8000"

[Setup]
AppId={{6B1F3C52-8E4A-4C5B-9C1E-7A2D41E0B7A1}
AppName=TikTrue
AppVersion={#AppVersion}
AppPublisher=TikTrue
DefaultDirName={autopf}\TikTrue
DefaultGroupName=TikTrue
DisableProgramGroupPage=yes
PrivilegesRequired=admin
ArchitecturesAllowed=x64compatible
ArchitecturesInstallIn64BitMode=x64compatible
OutputDir=..\..\dist
OutputBaseFilename=TikTrueSetup
Compression=lzma2/max
SolidCompression=yes
WizardStyle=modern
UninstallDisplayIcon={app}\main_app.exe
SetupLogging=yes

[Languages]
Name: "english"; MessagesFile: "compiler:Default.isl"

[Tasks]
Name: "desktopicon"; Description: "{cm:CreateDesktopIcon}"; GroupDescription: "{cm:AdditionalIcons}"

[Dirs]
Name: "{#DataDir}"

[Files]
Source: "{#Bundle}\*"; DestDir: "{app}"; Flags: ignoreversion recursesubdirs createallsubdirs

[Icons]
Name: "{group}\TikTrue"; Filename: "{app}\main_app.exe"; Comment: "This PC's TikTrue"
Name: "{group}\Uninstall TikTrue"; Filename: "{uninstallexe}"
Name: "{autodesktop}\TikTrue"; Filename: "{app}\main_app.exe"; Tasks: desktopicon

[Run]
; firewall: delete first, so that an upgrade leaves one rule of each, not two
Filename: "{sys}\netsh.exe"; Parameters: "advfirewall firewall delete rule name=""TikTrue node"""; Flags: runhidden
Filename: "{sys}\netsh.exe"; Parameters: "advfirewall firewall delete rule name=""TikTrue ports"""; Flags: runhidden
; the node's program: every port it opens (block servers pick free ports per network; mDNS)
Filename: "{sys}\netsh.exe"; Parameters: "advfirewall firewall add rule name=""TikTrue node"" dir=in action=allow program=""{app}\service_runner.exe"" enable=yes profile=private,domain"; Flags: runhidden; StatusMsg: "Opening the firewall for TikTrue on the LAN..."
Filename: "{sys}\netsh.exe"; Parameters: "advfirewall firewall add rule name=""TikTrue ports"" dir=in action=allow protocol=TCP localport={#ControlPort},{#GatewayPort} enable=yes profile=private,domain"; Flags: runhidden
Filename: "{app}\main_app.exe"; Description: "Open TikTrue"; Flags: postinstall nowait skipifsilent

[UninstallRun]
Filename: "{app}\tiktrue.exe"; Parameters: "service uninstall"; Flags: runhidden waituntilterminated; RunOnceId: "RemoveService"
Filename: "{sys}\netsh.exe"; Parameters: "advfirewall firewall delete rule name=""TikTrue node"""; Flags: runhidden; RunOnceId: "RemoveFirewallNode"
Filename: "{sys}\netsh.exe"; Parameters: "advfirewall firewall delete rule name=""TikTrue ports"""; Flags: runhidden; RunOnceId: "RemoveFirewallPorts"

[Code]
function RunTiktrue(const Params: String): Integer;
var
  ResultCode: Integer;
begin
  if not Exec(ExpandConstant('{app}\tiktrue.exe'), Params, '', SW_HIDE,
              ewWaitUntilTerminated, ResultCode) then
    ResultCode := -1;
  Result := ResultCode;
end;

{ An upgrade: the old service stops and goes before its files are replaced. }
function PrepareToInstall(var NeedsRestart: Boolean): String;
begin
  if FileExists(ExpandConstant('{app}\tiktrue.exe')) then
    RunTiktrue('service uninstall');
  Result := '';
end;

{ After the files: the service, installed and started (it waits until the node listens). }
procedure CurStepChanged(CurStep: TSetupStep);
begin
  if CurStep = ssPostInstall then
  begin
    WizardForm.StatusLabel.Caption := 'Starting the TikTrue service...';
    if RunTiktrue('service install --data-dir "' + ExpandConstant('{#DataDir}') + '"') <> 0 then
      MsgBox('The TikTrue service did not start. Its log is ' +
             ExpandConstant('{#DataDir}') + '\logs\node.log; "tiktrue service status" in ' +
             ExpandConstant('{app}') + ' says more.', mbError, MB_OK);
  end;
end;

{ The data (the node's identity, networks, models, accounts, conversations) stays unless the
  person asks to delete it; a silent uninstall keeps it. }
procedure CurUninstallStepChanged(CurUninstallStep: TUninstallStep);
begin
  if (CurUninstallStep = usPostUninstall) and not UninstallSilent then
    if MsgBox('Also delete TikTrue''s data on this PC (its networks, models, accounts and ' +
              'conversations in ' + ExpandConstant('{#DataDir}') + ')?',
              mbConfirmation, MB_YESNO or MB_DEFBUTTON2) = IDYES then
      DelTree(ExpandConstant('{#DataDir}'), True, True, True);
end;
